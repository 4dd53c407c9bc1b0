"""Run the upstream Qwen2LM on a model directory (under REF_PYTHON) and save its tokens and log-probs.

usage: llm_reference.py MODEL_DIR INPUT.pt OUTPUT.pt
INPUT holds: mode ('whole' | 'bistream'), text (list[int]), prompt_text, prompt_speech, seed.
"""
import sys

import torch
from hyperpyyaml import load_hyperpyyaml


def main(model_dir: str, input_path: str, output_path: str) -> None:
    spec = torch.load(input_path)
    with open(f"{model_dir}/cosyvoice2.yaml") as f:
        configs = load_hyperpyyaml(f, overrides={"qwen_pretrain_path": f"{model_dir}/CosyVoice-BlankEN"})
    llm = configs["llm"]
    llm.load_state_dict(torch.load(f"{model_dir}/llm.pt", map_location="cpu"), strict=True)
    llm.eval()
    recorded = []
    # one record per LM step (the sampler may be called several times a step when it redraws)
    llm.llm_decoder.register_forward_hook(
        lambda module, inputs, output: recorded.append(output.reshape(-1, output.shape[-1])[-1].log_softmax(-1).detach().clone()))
    text = torch.tensor([spec["text"]], dtype=torch.int32)
    prompt_text = torch.tensor([spec["prompt_text"]], dtype=torch.int32).reshape(1, -1)
    prompt_speech = torch.tensor([spec["prompt_speech"]], dtype=torch.int32).reshape(1, -1)
    embedding = torch.zeros(1, 0)
    torch.manual_seed(spec["seed"])
    if spec["mode"] == "whole":
        tokens = list(llm.inference(text=text, text_len=torch.tensor([text.shape[1]], dtype=torch.int32),
                                    prompt_text=prompt_text,
                                    prompt_text_len=torch.tensor([prompt_text.shape[1]], dtype=torch.int32),
                                    prompt_speech_token=prompt_speech,
                                    prompt_speech_token_len=torch.tensor([prompt_speech.shape[1]], dtype=torch.int32),
                                    embedding=embedding))
    else:
        def fragments():
            for fragment in spec["fragments"]:
                yield torch.tensor([fragment], dtype=torch.int32)

        tokens = list(llm.inference_bistream(text=fragments(), prompt_text=prompt_text,
                                             prompt_text_len=torch.tensor([prompt_text.shape[1]], dtype=torch.int32),
                                             prompt_speech_token=prompt_speech,
                                             prompt_speech_token_len=torch.tensor([prompt_speech.shape[1]], dtype=torch.int32),
                                             embedding=embedding))
    torch.save({"tokens": [int(t) for t in tokens], "logp": recorded}, output_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
