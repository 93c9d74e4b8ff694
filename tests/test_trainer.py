"""The training step's schedules and edge cases: k annealing (newer dictionary_learning's formula),
warmup and decay of the learning rate, a batch with no positive activation, fine-tuning."""

from __future__ import annotations

import sys

import pytest
import torch

from workbench.sae import BatchTopKSAE, MatryoshkaBatchTopKSAE
from workbench.training.step import Trainer, annealed_k, auto_lr, geometric_median, lr_factor

pytestmark = pytest.mark.usefixtures("one_thread")


def test_k_annealing_follows_the_formula_and_the_step_keeps_that_many_latents():
    D, k, K = 64, 8, 10
    expected = [int(D * (1 - min(s, K) / K) + k * min(s, K) / K) for s in range(15)]
    assert [annealed_k(s, k, D, K) for s in range(15)] == expected
    assert expected[0] == D and expected[5] == 36 and expected[10:] == [k] * 5
    assert [annealed_k(s, k, D, None) for s in (0, 5)] == [k, k]

    torch.manual_seed(0)
    B = 32
    trainer = Trainer(BatchTopKSAE(D, 256, k), 50, warmup_steps=2, k_anneal_steps=K)
    x = torch.randn(B, D) + 3  # all pre-activations positive enough that k*B entries are kept
    l0 = [trainer.update(x, log=True)["l0"] for _ in range(15)]
    assert l0 == [float(e) for e in expected]
    assert int(trainer.sae.k) == k  # the saved k is the target


def test_fine_tuning_does_not_anneal_k_nor_reinitialise_b_dec():
    torch.manual_seed(0)
    sae = BatchTopKSAE(16, 64, 4)
    with torch.no_grad():
        sae.b_dec.fill_(7.0)
    trainer = Trainer(sae, 10, lr=1e-12, warmup_steps=0, k_anneal_steps=5, fine_tune=True)
    log = trainer.update(torch.randn(8, 16) + 3, log=True)
    assert log["k"] == 4 and log["l0"] == 4.0
    torch.testing.assert_close(sae.b_dec.detach(), torch.full((16,), 7.0))
    fresh = Trainer(BatchTopKSAE(16, 64, 4), 10, lr=1e-12, warmup_steps=0)
    x = torch.randn(8, 16) + 3
    fresh.update(x)
    torch.testing.assert_close(fresh.sae.b_dec.detach(), geometric_median(x), rtol=1e-5, atol=1e-5)


def test_learning_rate_warms_up_stays_then_decays_linearly_to_zero():
    steps, warmup, decay = 100, 10, 80
    factors = [lr_factor(s, steps, warmup, decay) for s in range(steps)]
    assert factors[0] == 0.0 and factors[5] == 0.5 and factors[10:80] == [1.0] * 70
    assert factors[90] == pytest.approx(0.5) and factors[99] == pytest.approx(0.05)
    assert lr_factor(50, steps, warmup, None) == 1.0
    assert auto_lr(2**14) == pytest.approx(2e-4) and auto_lr(4 * 2**14) == pytest.approx(1e-4)

    trainer = Trainer(BatchTopKSAE(8, 32, 2), steps, warmup_steps=warmup, decay_start=decay)
    lrs = [trainer.update(torch.randn(16, 8), log=True)["lr"] for _ in range(steps)]
    assert lrs == pytest.approx([auto_lr(32) * f for f in factors])


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_a_batch_with_no_positive_activation_does_not_crash(arch):
    torch.manual_seed(0)
    sae = BatchTopKSAE(8, 32, 2) if arch == "batchtopk" else MatryoshkaBatchTopKSAE(8, 32, 2, [8, 24])
    trainer = Trainer(sae, 10, warmup_steps=1, threshold_start_step=0, dead_feature_threshold=16)
    with torch.no_grad():
        sae.b_enc_F.fill_(-1e4)  # every pre-activation is zero
    logs = [trainer.update(torch.randn(16, 8), log=True) for _ in range(3)]
    assert [log["l0"] for log in logs] == [0.0, 0.0, 0.0]
    assert float(sae.threshold) == 0.0  # the reference's rule: an empty batch counts as a minimum of 0
    assert all(torch.isfinite(p).all() for p in sae.parameters())
    assert logs[-1]["dead"] == 32  # nothing fired: every latent is dead after 16 tokens, and aux-k ran


def test_threshold_is_an_ema_of_the_smallest_kept_value():
    torch.manual_seed(0)
    trainer = Trainer(BatchTopKSAE(8, 32, 2), 10, lr=1e-12, warmup_steps=0, threshold_start_step=0)
    mins = []
    for _ in range(4):
        x = torch.randn(16, 8) + 2
        with torch.no_grad():
            pre = trainer.sae.pre_acts(x).flatten()
        mins.append(pre.topk(2 * 16).values.min().item())
        trainer.update(x)
    # step 0 is not > threshold_start_step; step 1 sets it; then the EMA with beta 0.999
    expected = mins[1]
    for m in mins[2:]:
        expected = 0.999 * expected + 0.001 * m
    assert float(trainer.sae.threshold) == pytest.approx(expected, rel=1e-6)


def test_schedule_arguments_are_checked():
    sae = BatchTopKSAE(8, 32, 2)
    with pytest.raises(ValueError, match="warmup_steps"):
        Trainer(sae, 10, warmup_steps=10)
    with pytest.raises(ValueError, match="decay_start"):
        Trainer(sae, 10, warmup_steps=5, decay_start=3)


def test_autocast_computes_the_encoder_in_bfloat16_and_keeps_k_latents():
    torch.manual_seed(0)
    trainer = Trainer(BatchTopKSAE(16, 64, 4), 10, warmup_steps=1, autocast_dtype=torch.bfloat16)
    logs = [trainer.update(torch.randn(32, 16) + 1, log=True) for _ in range(3)]
    assert [log["l0"] for log in logs] == [4.0, 4.0, 4.0]
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trainer.sae.parameters())


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_a_trainer_resumed_from_its_state_continues_bit_identically(arch, tmp_path):
    """Adam steps W_dec as its [F, D] storage; its moments are saved in the parameters' shapes, and a
    checkpoint holding them as contiguous [D, F] tensors (as before that storage) resumes the same."""
    def new_trainer():
        torch.manual_seed(0)
        sae = BatchTopKSAE(16, 512, 4) if arch == "batchtopk" else MatryoshkaBatchTopKSAE(16, 512, 4, [128, 384])
        return Trainer(sae, 20, warmup_steps=2)

    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(64, 16, generator=g) + 1 for _ in range(6)]
    straight = new_trainer()
    for x in xs:
        straight.update(x)
    first = new_trainer()
    for x in xs[:3]:
        first.update(x)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    shapes = {i: p.shape for i, p in enumerate(first.sae.parameters())}
    assert all(v.shape == shapes[i] for i, s in state["optimizer"]["state"].items() for k, v in s.items() if k != "step")
    old_layout = {**state, "optimizer": {**state["optimizer"], "state": {
        i: {k: v.contiguous() for k, v in s.items()} for i, s in state["optimizer"]["state"].items()}}}
    for resumed_state in (state, old_layout):
        resumed = new_trainer()
        resumed.load_state_dict(resumed_state)
        for x in xs[3:]:
            resumed.update(x)
        for (name, a), b in zip(straight.sae.state_dict().items(), resumed.sae.state_dict().values(), strict=True):
            assert torch.equal(a, b), name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_cpu_step_does_not_fault_in_fresh_pages_for_its_large_tensors():
    resource = pytest.importorskip("resource")
    torch.manual_seed(0)
    trainer = Trainer(BatchTopKSAE(16, 16384, 8), 20, warmup_steps=2)  # [B, F] float32: 64 MiB a tensor
    xs = [torch.randn(1024, 16) + 1 for _ in range(4)]
    for x in xs[:2]:
        trainer.update(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for x in xs[2:]:
        trainer.update(x)
    faults_per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 2
    assert faults_per_step < 2000  # a fresh 64 MiB encoder product alone would fault 16,384 pages
