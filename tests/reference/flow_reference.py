"""Runs upstream CosyVoice's CausalMaskedDiffWithXvec on saved inputs; executed under REF_PYTHON by
tests/test_flow_parity.py.

usage: flow_reference.py WORKDIR
  WORKDIR/config.json  {"models": {name: config}, "shapes_only": {name: config}} where a config is
                       {"flow": flow kwargs, "encoder": UpsampleConformerEncoder kwargs,
                        "cfm": CausalConditionalCFM kwargs (cfm_params a plain dict),
                        "estimator": CausalConditionalDecoder kwargs}
  WORKDIR/<name>.pt    for each of "models": a state dict written by our module, loaded with strict=True
  WORKDIR/cases.pt     list of {"model": name, "inputs": keyword arguments of `inference`}
writes WORKDIR/outputs.pt:
  {"mels": [mel per case],
   "shapes": {name: {key: shape}} of upstream's state dicts (models and shapes_only; the latter are
             built on the meta device, so even the release sizes cost nothing),
   "upstream_states": {name: upstream's own randomly initialised state dict} for "models"}
"""
import json
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig
from cosyvoice.flow.decoder import CausalConditionalDecoder
from cosyvoice.flow.flow import CausalMaskedDiffWithXvec
from cosyvoice.flow.flow_matching import CausalConditionalCFM
from cosyvoice.transformer.upsample_encoder import UpsampleConformerEncoder


def build(config: dict) -> CausalMaskedDiffWithXvec:
    cfm = dict(config["cfm"])
    cfm["cfm_params"] = DictConfig(cfm["cfm_params"])
    return CausalMaskedDiffWithXvec(
        **config["flow"],
        encoder=UpsampleConformerEncoder(**config["encoder"]),
        decoder=CausalConditionalCFM(**cfm, estimator=CausalConditionalDecoder(**config["estimator"])),
    ).eval()


def shapes(model: torch.nn.Module) -> dict:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def main(workdir: Path) -> None:
    torch.set_num_threads(1)
    config = json.loads((workdir / "config.json").read_text())
    models, upstream_states, all_shapes = {}, {}, {}
    for name, model_config in config["models"].items():
        model = build(model_config)
        upstream_states[name] = {k: v.clone() for k, v in model.state_dict().items()}
        all_shapes[name] = shapes(model)
        model.load_state_dict(torch.load(workdir / f"{name}.pt"), strict=True)
        models[name] = model
    for name, model_config in config.get("shapes_only", {}).items():
        with torch.device("meta"):
            all_shapes[name] = shapes(build(model_config))
    mels = []
    for case in torch.load(workdir / "cases.pt"):
        mel, _ = models[case["model"]].inference(**case["inputs"])
        mels.append(mel)
    torch.save({"mels": mels, "shapes": all_shapes, "upstream_states": upstream_states}, workdir / "outputs.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
