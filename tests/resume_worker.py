"""Run by test_resume.py in fresh processes: train, optionally stop at a step, save, or resume."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import small_llama  # noqa: E402

from epi import EPIConfig, EvolvingIsolation  # noqa: E402
from epi.training.checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from epi.training.loop import TrainConfig, make_optimizer, train_steps  # noqa: E402


def batch_fn(step):
    g = torch.Generator().manual_seed(1000 + step)
    task = ("a", "b")[step % 2]
    x = torch.randint(0, 48, (4, 12), generator=g)
    return task, {"input_ids": x, "labels": x}


def main(mode: str, out: str, steps: int = 24, stop: int = 11) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = small_llama()
    opt = make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1))
    scope = sys.argv[4] if len(sys.argv) > 4 else "global"
    iso = EvolvingIsolation(model, EPIConfig(ratio=0.1, refresh_every=4, warmup_steps=3, scope=scope)).attach(opt)
    ckpt = Path(out) / "ckpt.pt"
    state = None
    if mode == "second":
        state, _ = load_checkpoint(ckpt, model=model, optimizer=opt, engine=iso)
    last = stop if mode == "first" else steps
    state = train_steps(model, opt, batch_fn, steps=last, state=state, engine=iso)
    if mode == "first":
        save_checkpoint(ckpt, model=model, optimizer=opt, state=state, engine=iso)
    else:
        torch.save({"model": model.state_dict(), "losses": state.losses, "history": iso.history,
                    "digest": iso.mask_digest()}, Path(out) / f"{mode}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
