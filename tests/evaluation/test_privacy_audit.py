"""`arkfed audit privacy`: the loss-threshold attack sees a model that memorised its site, and sees
nothing in a model that never trained on it."""

from __future__ import annotations

import numpy as np
import torch

from arkfed.ark.losses import task_loss_per_sample
from arkfed.data.loaders import make_eval_loader
from arkfed.data.schema import LabelSchema
from arkfed.evaluation.privacy_audit import audit_privacy, loss_threshold_audit, tpr_at_fpr
from arkfed.model.ark import ArkModel, SiteHead
from arkfed.site.config import SiteConfig
from arkfed.site.load import Site
from arkfed.spec import ModelSpec
from synthetic import synthetic_table

SPEC = ModelSpec(model="test_resnet", img_size=32, projector_dim=32, norm="group")


def random_label_site(n=40) -> Site:
    """Labels that no image pattern predicts: only memorising the training images lowers their loss."""
    schema = LabelSchema(task="multilabel", classes=("a", "b", "c"))
    splits = {}
    for split, seed in (("train", 0), ("test", 1)):
        table = synthetic_table(n, schema.classes, 32, seed=seed)
        table.labels[:] = (np.random.default_rng(seed + 10).random(table.labels.shape) < 0.5).astype(np.float32)
        splits[split] = table
    return Site(SiteConfig(name="s", dataset="synthetic", root="."), None, schema, splits)


def memorised(site: Site, steps=60) -> tuple[ArkModel, SiteHead]:
    torch.manual_seed(0)
    model, head = ArkModel(SPEC), SiteHead("s", site.schema, SPEC.projector_dim)
    batch = next(iter(make_eval_loader(site.split("train"), site.schema, SPEC, 64)))  # the evaluation view, no augmentation
    optimizer = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=3e-3)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        task_loss_per_sample(head(model(batch.images)), batch.targets, batch.mask, "multilabel").mean().backward()
        optimizer.step()
    return model.eval(), head.eval()


def test_the_attack_sees_a_memorising_model_and_not_a_random_one():
    site = random_label_site()
    model, head = memorised(site)
    seen = audit_privacy(model, head, site, n_boot=200)
    assert seen["held_out"] == "test" and seen["members"] == seen["non_members"] == 40
    assert seen["attack_auc"] > 0.85 and seen["attack_auc_ci95"][0] > 0.7
    assert seen["tpr_at_0.01_fpr"] > 0.1
    torch.manual_seed(1)
    fresh = audit_privacy(ArkModel(SPEC).eval(), SiteHead("s", site.schema, SPEC.projector_dim).eval(), site, n_boot=200)
    assert 0.3 < fresh["attack_auc"] < 0.7
    assert fresh["attack_auc_ci95"][0] < 0.5 < fresh["attack_auc_ci95"][1]


def test_summary_numbers_of_the_attack():
    rng = np.random.default_rng(0)
    same = loss_threshold_audit(rng.exponential(1.0, 500), rng.exponential(1.0, 500), n_boot=200)
    low, high = same["attack_auc_ci95"]
    assert abs(same["attack_auc"] - 0.5) < 0.06 and low < same["attack_auc"] < high
    assert 0.04 < high - low < 0.11  # about 2 x 1.96 x the AUC's standard error, sqrt((1/500 + 1/500) / 12) = 0.018
    apart = loss_threshold_audit(np.full(50, 0.01), np.full(50, 2.0), n_boot=50)
    assert apart["attack_auc"] == 1.0 and apart["tpr_at_0.01_fpr"] == 1.0
    assert set(apart) == {"attack", "attack_auc", "attack_auc_ci95", "bootstrap", "tpr_at_0.01_fpr", "members", "non_members"}
    assert tpr_at_fpr(np.arange(100.0), np.arange(100.0)) == 0.0  # nothing above the top 1% of non-members
