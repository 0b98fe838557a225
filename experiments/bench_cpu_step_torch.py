"""The transformers side of bench_cpu_step.py: a worker that times PyTorch DeepseekV3 on request.

bench_cpu_step.py starts it under a Python that has torch and transformers (never the project's,
which must not import torch) and speaks line-delimited JSON with it: one request object a line on
stdin, one reply object a line on stdout (anything else the libraries print goes to stderr).

  {"cmd": "hello"}                          -> {"torch", "transformers", "threads"}
  {"cmd": "load", "name", "path"}           -> {"params"}: DeepseekV3ForCausalLM.from_pretrained
                                               (float32, eager attention) of an exported folder
  {"cmd": "logits", "name", "tokens", "out"} -> {}: float32 logits of the int32 .npy `tokens`
                                               [B, T] written to the .npy `out`
  {"cmd": "prepare", "key", "name", "work", "dtype", "batch", "seq", "new_tokens", "seed"}
                                            -> {"seconds"}: builds the work and runs it once
  {"cmd": "time", "key", "reps"}            -> {"seconds"}: mean seconds of `reps` calls
  {"cmd": "quit"}                           -> exits
A failed request answers {"error": "one line"}.

The work, eager PyTorch on the CPU ("bf16": torch.autocast("cpu", dtype=torch.bfloat16) around
the model, float32 master weights, as dsv3_jax's bf16 compute with float32 params):
  train    model(input_ids, labels=input_ids) (transformers' shifted cross-entropy), backward,
           clip_grad_norm_(1.0), torch.optim.AdamW(lr 2.2e-4, betas (0.9, 0.95), eps 1e-8,
           weight decay 0.1) step, on a copy of the loaded model in train mode
  prefill  model(input_ids).logits under torch.no_grad(), eval mode
  decode   model.generate(do_sample=False, max_new_tokens=n, min_new_tokens=n) with its cache
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import time
import traceback

import numpy as np

COMMANDS = ("hello", "load", "logits", "prepare", "time")


def _autocast(dtype: str):
    import torch

    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Worker:
    def __init__(self):
        self.models = {}  # name -> the loaded model (eval mode, never trained)
        self.works = {}  # key -> a function running one call

    def hello(self, req):
        import torch
        import transformers

        return {"torch": torch.__version__, "transformers": transformers.__version__,
                "threads": torch.get_num_threads()}

    def load(self, req):
        import torch
        from transformers import DeepseekV3ForCausalLM

        model = DeepseekV3ForCausalLM.from_pretrained(req["path"], torch_dtype=torch.float32,
                                                      attn_implementation="eager")
        self.models[req["name"]] = model.eval()
        return {"params": sum(p.numel() for p in model.parameters())}

    def logits(self, req):
        import torch

        tokens = torch.from_numpy(np.load(req["tokens"]).astype(np.int64))
        with torch.no_grad():
            out = self.models[req["name"]](input_ids=tokens).logits
        np.save(req["out"], out.float().numpy())
        return {}

    def prepare(self, req):
        import torch

        base, dtype = self.models[req["name"]], req["dtype"]
        rng = np.random.default_rng(req["seed"])
        vocab = base.config.vocab_size
        tokens = torch.from_numpy(rng.integers(3, vocab, (req["batch"], req["seq"])))
        if req["work"] == "train":
            model = copy.deepcopy(base).train()
            opt = torch.optim.AdamW(model.parameters(), lr=2.2e-4, betas=(0.9, 0.95), eps=1e-8,
                                    weight_decay=0.1)

            def run():
                opt.zero_grad(set_to_none=True)
                with _autocast(dtype):
                    loss = model(input_ids=tokens, labels=tokens).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                return float(loss)
        elif req["work"] == "prefill":
            def run():
                with torch.no_grad(), _autocast(dtype):
                    return base(input_ids=tokens).logits.shape
        elif req["work"] == "decode":
            n = req["new_tokens"]
            mask = torch.ones_like(tokens)

            def run():
                with torch.no_grad(), _autocast(dtype):
                    out = base.generate(input_ids=tokens, attention_mask=mask, do_sample=False,
                                        max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
                if out.shape != (tokens.shape[0], tokens.shape[1] + n):
                    raise RuntimeError(f"generate returned shape {tuple(out.shape)}")
                return out.shape
        else:
            raise ValueError(f"unknown work {req['work']!r}")
        self.works[req["key"]] = run
        start = time.perf_counter()
        run()
        return {"seconds": time.perf_counter() - start}

    def time(self, req):
        run, reps = self.works[req["key"]], int(req["reps"])
        start = time.perf_counter()
        for _ in range(reps):
            run()
        return {"seconds": (time.perf_counter() - start) / reps}


def main() -> int:
    reply_to = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # library prints must not reach the protocol stream
    worker = Worker()
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("cmd") == "quit":
            break
        try:
            if req.get("cmd") not in COMMANDS:
                raise ValueError(f"unknown command {req.get('cmd')!r}; use one of {COMMANDS}")
            reply = getattr(worker, req["cmd"])(req)
        except Exception as e:  # reported to the driver, which prints it and stops
            traceback.print_exc()
            reply = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
        reply_to.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
