"""vLLM (V1) logits processor that turns a request's logits into RAS's distribution (see `ras.py`).

A request opts in with `SamplingParams(extra_args={EXTRA_KEY: {...}})` and temperature 1, top_k off, top_p 1:

    top_k, top_p, win_size, tau_r   the RasConfig
    history                         decoded tokens before this vLLM request (the RAS window spans requests)
    eos                             the end-of-speech id
    mask_eos_steps                  eos is not allowed for this many of the request's first sampled tokens
                                    (the reference's ignore_eos redraw; -1: never allowed)

Rows of other requests pass through untouched. Importing this module also registers the exported model
architecture, so a vLLM process that unpickles this class (its engine core / worker, also under `spawn`) knows
`CosyVoice2LMForCausalLM`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from . import model as _model  # noqa: F401  (registers the architecture in this process)
from .ras import ras_logprobs, window_tensor

EXTRA_KEY = "cosyvoice_ras"


@dataclass
class _RowState:
    top_k: int
    top_p: float
    win_size: int
    threshold: float
    history: list[int]
    eos: int
    mask_eos_steps: int
    output: list[int]  # vLLM's live list of this request's sampled tokens


class RasLogitsProcessor(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.rows: dict[int, _RowState] = {}

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        args = (sampling_params.extra_args or {}).get(EXTRA_KEY)
        if args is None:
            return
        missing = [k for k in ("top_k", "top_p", "win_size", "tau_r", "eos") if k not in args]
        if missing:
            raise ValueError(f"{EXTRA_KEY}: missing {missing}")

    def is_argmax_invariant(self) -> bool:
        return False

    @staticmethod
    def _new_state(params, _prompt_ids, output_ids) -> _RowState | None:
        args = (params.extra_args or {}).get(EXTRA_KEY) if params is not None else None
        if args is None:
            return None
        win = int(args["win_size"])
        return _RowState(int(args["top_k"]), float(args["top_p"]), win, win * float(args["tau_r"]),
                         [int(t) for t in args.get("history", [])][-max(win, 0):] if win > 0 else [],
                         int(args["eos"]), int(args.get("mask_eos_steps", 0)), output_ids)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        indices = sorted(i for i in self.rows if i < logits.shape[0])
        if not indices:
            return logits
        states = [self.rows[i] for i in indices]
        width = max(s.win_size for s in states)
        windows = window_tensor([s.history + list(s.output[-(width + 4):]) for s in states], width, logits.device)
        # rows whose own window is shorter than `width` must not see older tokens: trim per row
        for r, s in enumerate(states):
            if s.win_size < width:
                windows[r, : width - s.win_size] = -1

        def col(values, dtype):
            return torch.tensor(values, dtype=dtype, device=logits.device)

        produced = [len(s.output) for s in states]
        mask_eos = col([s.mask_eos_steps < 0 or n < s.mask_eos_steps for s, n in zip(states, produced)], torch.bool)
        rows = col(indices, torch.long)
        out = ras_logprobs(logits[rows], windows, col([s.top_k for s in states], torch.long),
                           col([s.top_p for s in states], torch.float32),
                           col([s.threshold for s in states], torch.float32), mask_eos,
                           col([s.eos for s in states], torch.long))
        logits[rows] = out.to(logits.dtype)
        return logits
