"""How a run survives: resume from the last complete checkpoint, restart a dead learner group, and save
what Ctrl-C interrupted. The loop (:mod:`aapo_ray.driver`) reports its progress here and stays short.

Invariant: a checkpoint of step N holds the learner state after N updates and the prompt sampler's
state after N batches; ``metrics.jsonl`` is logged before the checkpoint, so a crash in between
re-runs the step and the log is cut back to the checkpoint on resume.
"""

from __future__ import annotations

import logging
from pathlib import Path

from aapo_ray import checkpoint as ckpt
from aapo_ray.collect import ACTOR_FAILURES
from aapo_ray.config import Config
from aapo_ray.data import PromptSampler
from aapo_ray.generator import GeneratorPool
from aapo_ray.learner import LearnerError, LearnerGroup
from aapo_ray.weight_sync import sync_policy

log = logging.getLogger(__name__)


def restore(run_dir: Path, cfg: Config, learners: LearnerGroup, policy: GeneratorPool, sampler: PromptSampler) -> int:
    """Load the last complete checkpoint (or the initial state) into fresh learners; returns its step."""
    last = ckpt.latest_checkpoint(run_dir)
    step = 0
    if last is not None:
        state = ckpt.load_state(last)
        learners.load_checkpoint(str(last / "learner"))
        sampler.load_state_dict(state["sampler"])
        step = state["step"]
        log.info("restored %s from %s (step %d)", run_dir, last.name, step)
    else:
        sampler.load_state_dict({**sampler.state_dict(), "epoch": 0, "pos": 0})
    sync_policy(policy, learners, version=step)
    return step


class Recovery:
    """The loop's progress as recovery needs it: the last logged step, whether the learners are between
    an update and its checkpoint, and the sampler state after the current and the previous step."""

    def __init__(self, run_dir: Path, cfg: Config, model_path: str, sampler: PromptSampler, policy: GeneratorPool):
        self.run_dir, self.cfg, self.model_path = run_dir, cfg, model_path
        self.sampler, self.policy = sampler, policy
        self.learner_restarts = 0
        self._mark(0)

    def _mark(self, step: int) -> None:
        self.logged, self.in_update, self._sampler_after = step, False, {step: self.sampler.state_dict()}

    def start(self, learners: LearnerGroup, resume: bool) -> int:
        """The first step to run from: the checkpoint's on resume, else 0 (weights pushed either way)."""
        step = restore(self.run_dir, self.cfg, learners, self.policy, self.sampler) if resume else 0
        self._mark(step)
        return step

    def sampled(self, step: int) -> None:
        """``step``'s prompts were drawn: remember the sampler state a checkpoint of it must hold (the
        last three steps: with ``rollout.overlap`` the next step's prompts are drawn before this one is saved)."""
        self._sampler_after[step] = self.sampler.state_dict()
        self._sampler_after = {k: v for k, v in self._sampler_after.items() if k >= step - 2}

    def updating(self) -> None:
        self.in_update = True

    def logged_step(self, step: int) -> None:
        self.logged = step

    def save(self, step: int, learners: LearnerGroup) -> None:
        ckpt.save_checkpoint(self.run_dir, step, learners, {"sampler": self._sampler_after[step]},
                             self.cfg.run.keep_checkpoints)

    def done_updating(self) -> None:
        self.in_update = False

    def restart_learners(self, exc: LearnerError, step: int, learners: LearnerGroup) -> tuple[LearnerGroup, int]:
        """A fresh learner group from the last checkpoint, if ``exc`` is a dead process and restarts are
        left; returns (learners, step to continue from). Otherwise raises with the resume command."""
        if (not isinstance(exc.__cause__, ACTOR_FAILURES) or self.learner_restarts >= self.cfg.run.max_learner_restarts
                or self.cfg.rollout.weight_sync == "nccl"):  # the engines' weight-update group died with rank 0
            raise RuntimeError(f"learner failed at step {step}: {exc}. The run directory is resumable: "
                               f"aapo train --resume {self.run_dir}") from exc
        self.learner_restarts += 1
        log.warning("learner died at step %d (%s); restarting the group from the last checkpoint", step, exc)
        source = learners.source
        learners.kill()
        learners = LearnerGroup(self.cfg, self.model_path, source=source)
        step = restore(self.run_dir, self.cfg, learners, self.policy, self.sampler)
        self._mark(step)
        return learners, step

    def interrupted(self, learners: LearnerGroup, say) -> None:
        """Ctrl-C: checkpoint the last fully logged step, unless the learners were mid-update (state unknown)."""
        last = ckpt.latest_checkpoint(self.run_dir)
        if self.in_update:
            say(f"interrupted during a learner update: resume restarts from {last or 'the start'}")
        elif self.logged > 0 and (last is None or last.name != f"step_{self.logged:06d}"):
            say(f"interrupted: saving a checkpoint of step {self.logged} in {self.run_dir}")
            ckpt.save_checkpoint(self.run_dir, self.logged, learners, {"sampler": self._sampler_after[self.logged]},
                                 self.cfg.run.keep_checkpoints)
