"""The shared resumable step loop (spp_det/training/loop.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from spp_det import io
from spp_det.errors import UserError
from spp_det.training.loop import StepLoop, lr_at, optimizer_step

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


class Killed(Exception):
    pass


def make_loop(tmp_path, name="s.pt", settings="s", steps=6, on_step=None) -> StepLoop:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    return StepLoop("test", steps, net, optimizer, seed=3, seed_stride=1_000, state_path=tmp_path / name,
                    settings=settings, checkpoint_every=2, on_step=on_step)


def body_of(loop: StepLoop):
    """A step: a batch drawn from the step's numpy generator, dropout from torch's global one."""
    def body(step):
        x = torch.from_numpy(step.rng.normal(size=(16, 4))).float()
        loss = (loop.module(x) - x.sum(1, keepdim=True)).pow(2).mean()
        optimizer_step(loop.optimizer, loss, lr_at(step.number, 0.1, [3], 0.1), "test", f"step {step.number}", "test.lr")
        return {"step": step.number, "loss": loss.item(), "lr": loop.optimizer.param_groups[0]["lr"]}
    return body


def test_the_schedule_steps_down_at_each_boundary():
    assert [lr_at(s, 1.0, [2, 4], 0.5) for s in range(6)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_a_killed_run_resumes_to_the_same_weights_history_and_rng(tmp_path):
    full = make_loop(tmp_path, "full.pt")
    full_history = full.run(body_of(full))
    assert [h["lr"] for h in full_history] == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01, 0.01])

    def kill_after_step_2(number, entry):
        if number == 2:
            raise Killed

    killed = make_loop(tmp_path, on_step=kill_after_step_2)
    with pytest.raises(Killed):
        killed.run(body_of(killed))
    state = io.load_torch(tmp_path / "s.pt")
    assert state["step"] == 2 and len(state["history"]) == 2  # the checkpoint after step 1 (every 2 steps)

    resumed = make_loop(tmp_path)
    with torch.no_grad():  # a different start: everything must come from the checkpoint
        for p in resumed.module.parameters():
            p.add_(1.0)
    torch.manual_seed(12345)
    done, history, _ = resumed.resume()
    assert done == 2
    assert torch.equal(torch.get_rng_state(), state["torch_rng"])  # the saved torch RNG state is restored
    history = resumed.run(body_of(resumed), done, history)
    assert history == full_history
    for (k, a), b in zip(full.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_checkpoint_of_other_settings_or_more_steps_is_not_resumed(tmp_path):
    loop = make_loop(tmp_path, settings="old")
    loop.run(body_of(loop))
    assert make_loop(tmp_path, settings="new").resume() == (0, [], {})
    assert make_loop(tmp_path, settings="old", steps=4).resume() == (0, [], {})  # 6 steps done > 4
    (tmp_path / "s.pt").unlink()
    io.save_torch({"net": {}, "iteration": 2, "settings": "old"}, tmp_path / "s.pt")  # an older format
    assert make_loop(tmp_path, settings="old").resume() == (0, [], {})


def test_a_loss_that_is_not_finite_stops_before_the_update():
    net = nn.Linear(2, 1)
    before = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = net(torch.ones(1, 2)).sum() * float("nan")
    with pytest.raises(UserError, match=r"finetune: the loss became nan at iteration 7; lower finetune.lr \(now 1\)"):
        optimizer_step(optimizer, loss, 0.1, "finetune", "iteration 7", "finetune.lr (now 1)")
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
