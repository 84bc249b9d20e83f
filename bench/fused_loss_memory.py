#!/usr/bin/env python
"""Peak memory of the LM head and loss, one forward and backward: transformers' path (the
logits formed, ``ForCausalLMLoss``) against the fused linear cross-entropy's plain-torch twin
(``loradrop_ds.fused_loss.chunked_linear_cross_entropy``, the algorithm of Liger's kernel).

    .venv/bin/python bench/fused_loss_memory.py [--tokens 2048] [--hidden 576] [--vocab 49152 128256]
                                               [--dtypes float32 bfloat16] [--out bench/results/fused_loss_memory.json]

Each measurement runs in a fresh process (one BLAS thread): the hidden states of one
``--tokens`` row (requiring a gradient, as after LoRA layers), a frozen LM head weight and
labels are made first, then the high-water mark is reset (``/proc/self/clear_refs``) and one
forward and backward run, as the training loop runs them (``out.logits`` stays alive until the
backward is done). The peak is ``VmHWM`` minus ``VmRSS`` at that reset, with glibc's mmap
threshold pinned (``MALLOC_MMAP_THRESHOLD_``), so a freed tensor leaves the resident set at
once and the peak is what was alive together. The report puts it beside the formula of
docs/METHODS.md (``model.liger``). On CPU, without DeepSpeed: what is measured is what the
loss holds, not a GPU allocator's peak. Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PATHS = ("transformers", "fused")
BYTES = {"float32": 4, "bfloat16": 2}


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(path: str, tokens: int, hidden: int, vocab: int, dtype: str) -> None:
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    sys.path.insert(0, str(REPO))
    from loradrop_ds.fused_loss import chunked_linear_cross_entropy, shifted_targets

    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(0)  # the head's initialisation: the same in both paths' processes
    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(1, tokens, hidden, generator=gen) / hidden**0.5).to(torch_dtype).requires_grad_(True)
    head = torch.nn.Linear(hidden, vocab, bias=False).to(torch_dtype).requires_grad_(False)
    labels = torch.randint(0, vocab, (1, tokens), generator=gen)
    labels[:, : tokens // 4] = -100  # a prompt
    # A small warm-up of the same ops, so first-call allocations are not counted.
    small = h[:, :8].detach().requires_grad_(True)
    ForCausalLMLoss(head(small), labels[:, :8], vocab).backward()
    chunked_linear_cross_entropy(small[0], head.weight, shifted_targets(labels[:, :8])).backward()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    start = _status_bytes("VmRSS")
    if path == "transformers":
        logits = head(h)  # LlamaForCausalLM.forward; the output (and its logits) lives through backward
        loss = ForCausalLMLoss(logits, labels, vocab)
    else:
        loss = chunked_linear_cross_entropy(h.view(-1, hidden), head.weight, shifted_targets(labels))
    loss.backward()
    peak = _status_bytes("VmHWM")
    print(json.dumps({"peak_over_start_bytes": peak - start, "loss": float(loss)}))


def measure(path: str, tokens: int, hidden: int, vocab: int, dtype: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    out = subprocess.run([sys.executable, __file__, "--child", path, str(tokens), str(hidden), str(vocab), dtype],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def formula(path: str, tokens: int, hidden: int, vocab: int, dtype: str) -> int:
    """docs/METHODS.md (``model.liger``), with d the dtype's bytes and the hidden states'
    gradient (T x H x d) that both paths end with. transformers' path at its backward peak:
    T x V x (d + 12), the logits in the model's dtype (held by the output), their fp32
    log-softmax, its gradient and the fp32 logits' gradient. The fused twin: the hidden
    states' gradient kept from its forward (T x H x d) and about two chunks of logits in the
    model's dtype and in fp32 (one chunk has about T x H elements)."""
    from loradrop_ds.fused_loss import default_chunk_tokens

    d = BYTES[dtype]
    grad_hidden = tokens * hidden * d
    if path == "transformers":
        return tokens * vocab * (d + 12) + grad_hidden
    return 2 * grad_hidden + 2 * default_chunk_tokens(tokens, vocab, hidden) * vocab * (d + 4)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        path, tokens, hidden, vocab, dtype = sys.argv[2:7]
        child(path, int(tokens), int(hidden), int(vocab), dtype)
        return 0
    sys.path.insert(0, str(REPO))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(BYTES))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "fused_loss_memory.json"))
    args = parser.parse_args()
    rows = []
    for vocab in args.vocab:
        for dtype in args.dtypes:
            for path in PATHS:
                m = measure(path, args.tokens, args.hidden, vocab, dtype)
                rows.append({"path": path, "tokens": args.tokens, "hidden": args.hidden, "vocab": vocab, "dtype": dtype,
                             "peak_over_start_bytes": m["peak_over_start_bytes"], "loss": m["loss"],
                             "formula_bytes": formula(path, args.tokens, args.hidden, vocab, dtype),
                             "bytes_per_token_vocab": round(m["peak_over_start_bytes"] / (args.tokens * vocab), 2)})
                print(json.dumps(rows[-1]))
    report = {"command": " ".join([".venv/bin/python bench/fused_loss_memory.py", *sys.argv[1:]]),
              "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, no GPU; children with OMP_NUM_THREADS=1",
              "peak_measure": "VmHWM - VmRSS after the inputs are made (high-water mark reset), MALLOC_MMAP_THRESHOLD_=131072",
              "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
