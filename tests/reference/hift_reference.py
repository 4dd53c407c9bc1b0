"""Runs upstream CosyVoice's HiFTGenerator on saved inputs; executed under REF_PYTHON by tests/test_hift_parity.py.

usage: hift_reference.py WORKDIR
  WORKDIR/config.json   {"hift": HiFTGenerator kwargs without f0_predictor, "f0": ConvRNNF0Predictor kwargs}
  WORKDIR/<name>.pt     state dicts named in cases (loaded the way upstream's CosyVoice2Model.load does:
                        'generator.' removed, then load_state_dict(strict=True))
  WORKDIR/cases.pt      list of {"state": name, "mel": [B,80,T], "cache_source": [B,1,S], "seed": int}
writes WORKDIR/outputs.pt: list of {"speech", "source"}, one per case, each run right after
torch.manual_seed(case["seed"]) so the source noise is reproducible.
"""
import json
import sys
from pathlib import Path

import torch
from cosyvoice.hifigan.f0_predictor import ConvRNNF0Predictor
from cosyvoice.hifigan.generator import HiFTGenerator


def build(config: dict, state_dict: dict) -> HiFTGenerator:
    model = HiFTGenerator(**config["hift"], f0_predictor=ConvRNNF0Predictor(**config["f0"]))
    model.load_state_dict({k.replace("generator.", ""): v for k, v in state_dict.items()}, strict=True)
    return model.eval()


def main(workdir: Path) -> None:
    config = json.loads((workdir / "config.json").read_text())
    cases = torch.load(workdir / "cases.pt")
    models = {}
    outputs = []
    for case in cases:
        if case["state"] not in models:
            models[case["state"]] = build(config, torch.load(workdir / f"{case['state']}.pt"))
        torch.manual_seed(case["seed"])
        speech, source = models[case["state"]].inference(speech_feat=case["mel"], cache_source=case["cache_source"])
        outputs.append({"speech": speech.clone(), "source": source.clone()})
    torch.save(outputs, workdir / "outputs.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
