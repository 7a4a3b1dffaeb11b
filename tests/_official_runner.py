"""Run the official ``rwkv`` pip package on a checkpoint (used by tests/test_checkpoints.py in a subprocess).

``python tests/_official_runner.py MODEL.pth IN.pt OUT.pt``: IN holds ``tokens`` (a list of lists, segments fed
one after another with the state carried) and optionally ``state`` (a pip state list to start from). OUT gets,
per segment, the logits at every position of the sequence call (``full_output=True``) and of a token-by-token
loop, and the final pip state of both. The pip package reads ``RWKV_V7_ON`` at import, so it must be set by the
caller's environment, which is why this runs in its own process.
"""

import os
import sys

os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")

import torch  # noqa: E402
from rwkv.model import RWKV  # noqa: E402


def main(model_path: str, in_path: str, out_path: str) -> None:
    inp = torch.load(in_path, weights_only=True)
    name = model_path[: -len(".pth")]
    # RWKV_x070 (what RWKV is with RWKV_V7_ON=1) takes no verbose argument
    model = RWKV(name, "cpu fp32") if os.environ.get("RWKV_V7_ON") == "1" else RWKV(name, "cpu fp32", verbose=False)

    def fresh(state):
        return None if state is None else [s.clone() for s in state]

    seq_state, loop_state = fresh(inp.get("state")), fresh(inp.get("state"))
    out = {"seq": [], "loop": []}
    for tokens in inp["tokens"]:
        logits, seq_state = model.forward(list(tokens), seq_state, full_output=True)
        out["seq"].append(logits.reshape(len(tokens), -1).clone())
        rows = []
        for t in tokens:
            y, loop_state = model.forward([t], loop_state)
            rows.append(y.clone())
        out["loop"].append(torch.stack(rows))
    out["seq_state"] = [s.clone() for s in seq_state]
    out["loop_state"] = [s.clone() for s in loop_state]
    torch.save(out, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
