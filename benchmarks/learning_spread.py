"""Run every test that asserts learning with several seeds and report what each one measured.

    python benchmarks/learning_spread.py --seeds 0 1 2            # all learning tests, ~40 min on 2 cores
    python benchmarks/learning_spread.py --seeds 0 1 2 \
        --tests tests/test_cli.py::test_each_method_learns_the_builtin_task_through_the_cli
    python benchmarks/learning_spread.py --seeds 0 1 2 --update --tests TEST ...   # rerun a few, keep the rest

Each seed is one pytest run of the learning tests with ``LIT_ALIGN_TEST_SEED`` set (tests/conftest.py:
the run's ``seed_everything``, the data's shuffling seed and the tiny model's initialisation all
take it). The tests keep the numbers they assert on as junit properties (the ``measured`` fixture);
this script prints, per test and metric, the first and last value at every seed, whether the test
passed: the spread the assertions' thresholds must leave room for. CI runs seed 0 only.
Writes ``benchmarks/results/learning_spread.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "results"
LEARNING_TESTS = [
    "tests/test_cli.py::test_each_method_learns_the_builtin_task_through_the_cli",
    "tests/test_record_shapes.py::test_dpo_trains_end_to_end_through_the_cli",
    "tests/test_listwise.py::test_each_listwise_config_learns_the_builtin_task_through_the_cli",
    "tests/test_unpaired.py::test_each_unpaired_method_learns_the_builtin_task_through_the_cli",
    "tests/test_arithmetic_task.py::test_dpop_on_correct_versus_slip_pairs_learns_the_held_out_preference_and_keeps_the_answers",
    "tests/test_reward_model.py::test_reward_config_learns_the_builtin_task_and_exports",
    "tests/test_reward_model.py::test_reward_model_learns_ranked_lists_through_the_cli",
    "tests/test_reference_sync.py::test_tr_dpo_config_learns_the_builtin_task",
    "tests/test_reference_sync.py::test_sdpo_config_learns_the_builtin_task",
    "tests/test_tdpo.py::test_tdpo_learns_the_builtin_task_through_the_cli",
    "tests/test_subclassing_guide.py::test_each_worked_example_learns_through_the_cli",
    "tests/test_subclassing_guide.py::test_each_on_policy_example_raises_held_out_reward_through_the_cli",
    "tests/test_readme_example.py::test_example_trains_through_the_cli_as_the_readme_says",
    "tests/test_on_policy.py::test_each_on_policy_method_raises_held_out_reward",
    "tests/test_on_policy.py::test_each_grpo_refinement_raises_held_out_exact_match_on_the_reasoning_task",
    "tests/test_on_policy.py::test_ppo_ptx_term_lowers_nll_of_held_out_demonstrations",
    "tests/test_on_policy.py::test_sft_reward_model_ppo_pipeline_through_the_cli",
    "tests/test_trpo.py::test_trpo_config_raises_held_out_reward_inside_the_trust_region",
    "tests/test_online_dpo.py::test_online_dpo_config_raises_held_out_reward",
]


def run_seed(seed: int, tests: list[str], report: Path) -> Path:
    """One pytest run of ``tests`` with ``LIT_ALIGN_TEST_SEED=seed``, its junit XML written to ``report``."""
    OUT.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LIT_ALIGN_TEST_SEED": str(seed), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    print(f"seed {seed}: running {len(tests)} learning tests ...", flush=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "junit_family=xunit1",
            f"--junitxml={report}",
            *tests,
        ],
        cwd=ROOT,
        env=env,
        check=False,
    )
    return report


def update_report(report: Path, update: Path) -> None:
    """Replace (or add) the test cases of ``update`` in the junit file ``report`` (``update`` becomes
    ``report`` where there is no earlier run here: the junit files are not committed, the CSV is)."""
    if not report.exists():
        update.replace(report)
        return
    tree = ElementTree.parse(report)
    suite = next(tree.getroot().iter("testsuite"))
    fresh = list(ElementTree.parse(update).getroot().iter("testcase"))
    names = {(case.get("classname"), case.get("name")) for case in fresh}
    for case in list(suite.iter("testcase")):
        if (case.get("classname"), case.get("name")) in names:
            suite.remove(case)
    suite.extend(fresh)
    tree.write(report)


def read_report(path: Path) -> dict[str, dict]:
    """test id -> {"passed": bool, "metrics": {name: [values]}}."""
    results = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rpartition('.')[2]}::{case.get('name')}"
        failed = any(child.tag in ("failure", "error") for child in case)
        skipped = any(child.tag == "skipped" for child in case)
        metrics = {prop.get("name"): json.loads(prop.get("value")) for prop in case.iter("property")}
        results[name] = {"passed": not failed and not skipped, "skipped": skipped, "metrics": metrics}
    return results


def merge_earlier_rows(path: Path, header: list[str], rows: list[list]) -> list[list]:
    """``rows`` plus the rows of the committed CSV ``path`` whose tests were not rerun (same seeds only)."""
    if not path.exists():
        return rows
    with open(path, newline="") as handle:
        earlier_header, *earlier = list(csv.reader(handle))
    if earlier_header != header:
        raise SystemExit(f"{path} has columns {earlier_header}, this run {header}: rerun with the same --seeds")
    rerun = {row[0] for row in rows}
    return sorted([*[row for row in earlier if row[0] not in rerun], *rows], key=lambda row: (row[0], row[1]))


def describe(values) -> str:
    """'first -> last' of a metric's logged values (dicts of named series: each named)."""
    if isinstance(values, dict):
        return "; ".join(f"{name} {describe(series)}" for name, series in values.items())
    if isinstance(values, list) and values:
        return f"{values[0]:.3f} -> {values[-1]:.3f}" if len(values) > 1 else f"{values[0]:.3f}"
    return str(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tests", nargs="+", default=LEARNING_TESTS)
    parser.add_argument(
        "--reuse", action="store_true", help="read the junit files of an earlier run instead of running the tests"
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="run only --tests and replace their results in the junit files of an earlier run and in"
        " learning_spread.csv (after retuning a few)",
    )
    args = parser.parse_args()
    by_seed = {}
    for seed in args.seeds:
        report = OUT / f"learning_spread_seed{seed}.xml"
        if args.update:
            update_report(report, run_seed(seed, args.tests, OUT / f"learning_spread_seed{seed}_update.xml"))
        elif not args.reuse:
            run_seed(seed, args.tests, report)
        by_seed[seed] = read_report(report)
    tests = sorted({name for results in by_seed.values() for name in results})
    header = ["test", "metric", *[f"seed {seed}" for seed in args.seeds], "passed"]
    rows = []
    for test in tests:
        metrics = sorted(
            {metric for results in by_seed.values() for metric in results.get(test, {}).get("metrics", {})}
        )
        passed = sum(by_seed[seed].get(test, {}).get("passed", False) for seed in args.seeds)
        for metric in metrics:
            cells = [describe(by_seed[seed].get(test, {}).get("metrics", {}).get(metric, "n/a")) for seed in args.seeds]
            rows.append([test, metric, *cells, f"{passed}/{len(args.seeds)}"])
    if args.update:
        rows = merge_earlier_rows(OUT / "learning_spread.csv", header, rows)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import machine_summary, markdown_table
    from _report import write_csv

    write_csv(OUT / "learning_spread.csv", header, rows)
    print(f"\nMachine: {machine_summary()}\n")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
