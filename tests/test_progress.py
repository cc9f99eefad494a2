"""Long stages show progress on stderr: the training loop's bar names a task's held-out
accuracy at each evaluation (SFT --eval-n, GRPO, speedrun-rl's SFT), and says nothing
with progress off."""

from __future__ import annotations

import pytest
import torch

from nanoseek.model import CausalLM
from nanoseek.train.config import TrainConfig
from nanoseek.train.loop import Trainer
from nanoseek.train.pretrain import pretrain_loss
from tests.train_utils import micro_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(tmp_path, progress: bool) -> None:
    torch.manual_seed(0)
    model = CausalLM(micro_config())

    def next_batch(step, micro):
        x = torch.randint(3, 384, (2, 17), generator=torch.Generator().manual_seed(step))
        return x[:, :-1], x[:, 1:]
    cfg = TrainConfig(max_steps=2, batch_size=2, seq_len=16, warmup_steps=0, eval_every=1, save_every=0,
                      sample_every=0, compile="off", precision="fp32")
    Trainer(model, cfg, tmp_path, next_batch=next_batch, loss_fn=pretrain_loss,
            count_targets=lambda b: model.loss_targets(b[1]), evaluate=lambda m: {"accuracy": 0.25}, progress=progress).fit()


def test_the_bar_reports_held_out_accuracy_on_stderr(tmp_path, capfd):
    _fit(tmp_path / "on", progress=True)
    out, err = capfd.readouterr()
    assert "step 1: held-out accuracy 0.250" in err and "train" in err and not out
    _fit(tmp_path / "off", progress=False)
    assert capfd.readouterr() == ("", "")


def test_speedrun_rl_stages_pass_progress_on():
    import inspect

    from nanoseek.recipes import speedrun_rl
    from nanoseek.train.posttrain import dpo
    assert inspect.signature(speedrun_rl.speedrun_rl).parameters["progress"].default is True
    for stage in (speedrun_rl.sft_stage, speedrun_rl.grpo_stage, dpo.sample_pairs, dpo.load_pairs):
        assert "progress" in inspect.signature(stage).parameters, stage.__name__
