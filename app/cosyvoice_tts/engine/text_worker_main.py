"""The text normalisation worker process (text_worker.py): `python -m cosyvoice_tts.engine.text_worker_main DIR`."""
import sys

from .text_worker import serve

if __name__ == "__main__":
    serve(sys.argv[1])
