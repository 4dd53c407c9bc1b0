"""Developer tools: writers for random model directories in the release layout and their parts.

- `onnx_models`: tiny `campplus.onnx` / `speech_tokenizer_v2.onnx` stand-ins with the official interfaces;
- `tokenizer_dir`: a small trained Qwen2-style tokenizer for `CosyVoice-BlankEN/`.

Submodules are imported explicitly (nothing is imported here) so that using one tool does not pull in the
dependencies of the others.
"""
