"""Shared fixtures: where the real test data lives, and small helpers to build tiny datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

torch_threads = os.environ.setdefault("ARKFED_TEST_THREADS", "2")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("ARKFED_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real label files, MedMNIST, lung masks, sample images); skip if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set ARKFED_SHARED_DATA or check out ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def label_files(shared_data: Path) -> Path:
    return shared_data / "label-files"


# `make test-fast` runs `-m "not slow"`: the unit tests, about a minute on 2 idle cores. Slow are
# the tests that train models end to end, start federation processes or build a wheel (whole
# modules below), and single tests measured at over ~4 s on the development machine. Everything
# runs in `make test`, which is what CI runs. A test file added to a folder listed here is slow.
SLOW_MODULES = (
    "ark/test_privacy_visit.py",
    "benchmarking/test_accrual.py",
    "cli/test_cli_train.py",
    "console/test_console_browser.py",
    "evaluation/test_bias.py",
    "evaluation/test_compare.py",
    "evaluation/test_evaluate.py",
    "evaluation/test_finetune.py",
    "evaluation/test_linear_probe.py",
    "evaluation/test_plots.py",
    "evaluation/test_protocol.py",
    "evaluation/test_release.py",
    "evaluation/test_report.py",
    "evaluation/test_segment.py",
    "evaluation/test_zero_shot.py",
    "federation/test_federation_loopback.py",
    "federation/test_living_federation.py",
    "federation/test_policy_federation.py",
    "federation/test_security_federation.py",
    "federation/test_security_nginx.py",
    "federation/test_security_superexec.py",
    "run/test_privacy_run.py",
    "run/test_provenance.py",
    "run/test_trackers.py",
    "run/test_train_local.py",
    "test_wheel_install.py",
)
SLOW_TESTS = (
    "ark/test_distributed.py::test_two_process_visit_matches_one_process_visit_of_the_same_global_batch",
    "ark/test_visit.py::test_visit_is_deterministic_and_leaves_the_teacher_alone",
    "ark/test_visit.py::test_visit_trains_student_and_head_and_keeps_callers_rng",
    "benchmarking/test_accrual_demo.py::test_vindr_site_reads_through_the_plugin_with_reader_votes",
    "benchmarking/test_accrual_demo.py::test_vindr_is_opt_in_and_leaves_the_other_sites_unchanged",
    "data/test_cache.py::test_site_yaml_cache_auto_prepares_on_first_use_and_trains_identically",
    "evaluation/test_export.py::test_export_ships_teacher_heads_and_the_batchnorm_statistics_evaluate_used",
    "evaluation/test_privacy_audit.py::test_the_attack_sees_a_memorising_model_and_not_a_random_one",
    "federation/test_federation_client.py::test_visits_match_local_mode_and_the_head_survives_a_supernode_restart",
    "federation/test_membership.py::test_the_loop_admits_a_site_at_the_start_of_its_round_and_keeps_the_visits_before",
    "federation/test_site_errors.py::test_an_error_with_a_windows_path_and_mimic_ids_leaves_as_a_category_only",
    "model/test_ark_checkpoints.py::test_published_checkpoint_loads_with_features_of_the_hand_loaded_timm_model",
    "run/test_attendance.py::test_a_late_site_enters_at_the_next_round_and_an_absent_one_is_dropped_then_back",
    "run/test_attendance.py::test_a_local_run_with_a_quorum_goes_on_without_a_site_whose_data_cannot_be_read",
    "site/test_policy.py::test_manual_approval_waits_for_the_operator",
    "site/test_privacy_budget.py::test_a_new_process_continues_the_same_history",
    "site/test_policy.py::test_per_class_metrics_stay_at_the_site_when_its_policy_says_so",
)


def pytest_collection_modifyitems(config, items) -> None:
    tests = Path(__file__).resolve().parent
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if tests not in path.parents:
            continue
        where = path.relative_to(tests).as_posix()
        if where in SLOW_MODULES or f"{where}::{item.name.split('[')[0]}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
