"""A DP visit (arkfed.ark.privacy): per-sample gradients of Ark's loss, clipped to the policy's norm,
noise added and drawn from the site's secret, BatchNorm refused naming the layer."""

from __future__ import annotations

import copy

import pytest
import torch

from arkfed.ark.pair import ArkPair, SiteHeads
from arkfed.ark.privacy import StudentWithHead, private_losses, private_training, unsupported_layer
from arkfed.ark.visit import train_site_visit
from arkfed.config import TrainSettings, VisitPlan
from arkfed.data.loaders import TrainCollate, TrainDataset
from arkfed.data.transforms import ViewPair
from arkfed.model.ark import ArkModel, SiteHead
from arkfed.site.budget import BudgetLedger, PrivacyRefused
from arkfed.site.config import SiteConfig
from arkfed.site.load import Site
from arkfed.spec import ModelSpec
from synthetic import multilabel_schema, synthetic_table

GROUP = ModelSpec(model="test_resnet", img_size=32, projector_dim=16, norm="group")
SETTINGS = TrainSettings(batch_size=8, max_steps_per_visit=3, lr=0.05, optimizer="sgd", ema="iteration")


def dp_site(state_dir, epsilon=1000.0, max_grad_norm=0.05) -> Site:
    schema = multilabel_schema()
    config = SiteConfig(name="s1", dataset="synthetic", root=".", state_dir=state_dir,
                        policy={"privacy": {"epsilon": epsilon, "max_grad_norm": max_grad_norm}})
    return Site(config, None, schema, {"train": synthetic_table(32, schema.classes, 32, seed=0)})


def pair_of(spec=GROUP) -> ArkPair:
    torch.manual_seed(0)
    student = ArkModel(spec)
    return ArkPair(student, copy.deepcopy(student), SiteHeads.fresh(SiteHead("s1", multilabel_schema(), spec.projector_dim)))


def plan(seed=11) -> VisitPlan:
    return VisitPlan(round=0, visit=0, total_visits=2, site="s1", consistency=0.3, momentum=0.95, lr=0.05, seed=seed, rounds=2)


def test_per_sample_gradients_are_each_images_own_and_clipped_then_noised(tmp_path):
    from arkfed.ark.privacy import TupleCollate
    from arkfed.ark.visit import make_optimizer

    site, pair = dp_site(tmp_path), pair_of()
    table = site.split("train")
    dataset = TrainDataset(table, site.schema, 32, ViewPair(32, (0.5, 1.0)), torch.arange(len(table)).numpy(), 3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=TupleCollate(TrainCollate(GROUP)),
                                         generator=torch.Generator().manual_seed(0))
    pair.student.train()
    optimizer = make_optimizer(pair.student, pair.head, SETTINGS, 0.05)
    private = private_training(pair.student, pair.head, optimizer, loader, site, SETTINGS, plan())
    batch = next(iter(private.batches()))
    images = batch.student[:4]
    with torch.no_grad():
        z_teacher = pair.teacher(batch.teacher[:4])

    def losses(module, i):
        z, logits = module(images[i])
        return private_losses(logits, batch.targets[i], batch.mask[i], z, z_teacher[i], 0.3, "multilabel", "ce")[0]

    private.optimizer.zero_grad(set_to_none=True)
    losses(private.module, slice(0, 4)).backward()
    params = private.params
    per_sample = [p.grad_sample.detach().clone() for p in params]
    reference = StudentWithHead(copy.deepcopy(pair.student), copy.deepcopy(pair.head))
    for i in range(4):  # each image's gradient, computed alone, is its per-sample gradient: no term mixes samples
        reference.zero_grad()
        losses(reference, slice(i, i + 1)).backward()
        for g, p in zip(per_sample, reference.parameters()):
            torch.testing.assert_close(g[i], p.grad, rtol=1e-3, atol=3e-5)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample], dim=1).norm(dim=1)
    assert (norms > 0.05).all()  # so every sample is clipped
    private.optimizer.step()
    factor = (0.05 / (norms + 1e-6)).clamp(max=1.0)
    clipped = [factor.view(-1, *[1] * (g.dim() - 1)) * g for g in per_sample]
    assert torch.stack([c.flatten(1).norm(dim=1) for c in clipped], 1).norm(dim=1).max() <= 0.05 + 1e-5
    for p, c in zip(params, clipped):
        torch.testing.assert_close(p.summed_grad, c.sum(0), rtol=1e-4, atol=1e-7)
    noise = torch.cat([(p.grad * private.optimizer.expected_batch_size - p.summed_grad).flatten() for p in params])
    sigma = private.charge.noise_multiplier
    assert noise.std().item() == pytest.approx(sigma * 0.05, rel=0.1)  # Gaussian noise of sigma * C


def test_dp_visits_reproduce_with_the_same_seed_and_differ_with_another(tmp_path):
    site = dp_site(tmp_path)
    results = []
    for seed in (11, 11, 12):
        pair = pair_of()
        result = train_site_visit(pair, site, SETTINGS.model_copy(update={"max_steps_per_visit": 2}), plan(seed))
        results.append((result, torch.cat([p.detach().flatten() for p in pair.student.parameters()])))
    (r1, w1), (r2, w2), (r3, w3) = results
    assert torch.equal(w1, w2)
    assert not torch.allclose(w1, w3)
    assert r1.noise_multiplier == r2.noise_multiplier > 0
    ledger = BudgetLedger(tmp_path, site.config.policy.privacy, 32)
    assert r3.epsilon_spent == pytest.approx(ledger.spent(), rel=1e-6) and r3.epsilon_budget == 1000.0
    assert r1.epsilon_spent < r2.epsilon_spent < r3.epsilon_spent
    assert len(ledger.entries()) == 3


def test_a_resnet_with_batchnorm_is_refused_naming_the_layer_and_norm_group_converts_it(tmp_path):
    timm_norm = pair_of(GROUP.model_copy(update={"norm": "timm"}))
    with pytest.raises(PrivacyRefused, match=r"privacy: layer student\.backbone\.conv1\.1 \(BatchNorm2d\) .* norm: group"):
        train_site_visit(timm_norm, dp_site(tmp_path), SETTINGS, plan())
    assert not (tmp_path / "privacy-ledger.json").exists()  # refused before anything was charged
    grouped = pair_of()
    assert unsupported_layer(StudentWithHead(grouped.student, grouped.head)) is None
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in grouped.student.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in grouped.student.modules())


def test_a_vit_trains_with_dp_as_it_is_and_swin_is_refused_naming_its_layer(tmp_path):
    vit = ModelSpec(model="test_vit", img_size=32, projector_dim=16)
    pair = pair_of(vit)
    result = train_site_visit(pair, dp_site(tmp_path / "vit"), SETTINGS, plan())
    assert result.epsilon_spent > 0 and result.steps == 3
    for module in (*pair.student.modules(), *pair.head.modules()):  # nothing of Opacus stays on the models
        assert not module._forward_hooks and not module._backward_hooks
    assert not any(hasattr(p, "grad_sample") for p in [*pair.student.parameters(), *pair.head.parameters()])
    swin = ModelSpec(model="swin_tiny_patch4_window7_224", img_size=56, projector_dim=16)
    with pytest.raises(PrivacyRefused, match=r"privacy: Opacus cannot train this model: "
                       r"layer student\.backbone\.layers\.0\.blocks\.0\.attn \(WindowAttention\)"):
        train_site_visit(pair_of(swin), dp_site(tmp_path / "swin"), SETTINGS, plan())
    assert not (tmp_path / "swin" / "privacy-ledger.json").exists()
