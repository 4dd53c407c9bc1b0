"""Load a CosyVoice2 model directory in the official release layout."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .hparams import HParams
from .registry import model_registry

RELEASE_FILES = ("cosyvoice2.yaml", "llm.pt", "flow.pt", "hift.pt", "spk2info.pt", "campplus.onnx",
                 "speech_tokenizer_v2.onnx", "CosyVoice-BlankEN")


class ModelDirError(ValueError):
    """The directory is not a loadable CosyVoice2 release."""


@dataclass
class LoadedModel:
    hparams: HParams
    llm: torch.nn.Module
    flow: torch.nn.Module
    hift: torch.nn.Module
    model_dir: Path


def check_layout(model_dir: Path) -> None:
    missing = [name for name in RELEASE_FILES if not (model_dir / name).exists()]
    if missing:
        raise ModelDirError(f"{model_dir}: not a CosyVoice2 model directory, missing {', '.join(missing)}")


def load_state_dict_strict(module: torch.nn.Module, path: Path, state: dict | None = None,
                           optional: tuple[str, ...] = ()) -> None:
    """strict=True loading whose error names the file and every missing or unexpected key."""
    if state is None:
        state = torch.load(path, map_location="cpu", weights_only=True)
    expected = set(module.state_dict().keys())
    found = set(state.keys())
    missing = sorted(expected - found - set(optional))
    unexpected = sorted(found - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
        raise ModelDirError(f"{path}: checkpoint does not match the model ({'; '.join(parts)})")
    for key in optional:
        if key not in state:
            state[key] = module.state_dict()[key]
    module.load_state_dict(state, strict=True)


def build_modules(model_dir: str | Path) -> LoadedModel:
    """Build llm/flow/hift from the yaml and load the release checkpoints into them (on the CPU)."""
    model_dir = Path(model_dir)
    check_layout(model_dir)
    hparams = HParams.from_file(model_dir / "cosyvoice2.yaml",
                                overrides={"qwen_pretrain_path": str(model_dir / "CosyVoice-BlankEN")})
    registry = model_registry()
    llm = hparams.build("llm", registry)
    flow = hparams.build("flow", registry)
    hift = hparams.build("hift", registry)

    # A tied text head may be saved once or twice; either way it is the embedding.
    tied = ("llm.model.lm_head.weight",) if llm.llm.config.tie_word_embeddings else ()
    load_state_dict_strict(llm, model_dir / "llm.pt", optional=tied)
    load_state_dict_strict(flow, model_dir / "flow.pt")
    from .modules.hift import normalize_hift_state_dict

    hift_state = normalize_hift_state_dict(torch.load(model_dir / "hift.pt", map_location="cpu", weights_only=True))
    load_state_dict_strict(hift, model_dir / "hift.pt", state=hift_state)
    hift.fold_weight_norm()  # inference never needs the weight-norm split; folding saves work every call
    for module in (llm, flow, hift):
        module.eval()
    return LoadedModel(hparams, llm, flow, hift, model_dir)
