"""benchmarks.shards and testlog's --shard: N processes split one collection, every test once."""
import json
import subprocess
import sys

import pytest

from benchmarks.testlog import parse_shard
from kit import ROOT

TESTS = """
import pytest

@pytest.mark.parametrize("k", range(7))
def test_numbered(k):
    assert k != {failing}
"""


def _run_shards(tmp_path, shards, failing=-1):
    path = tmp_path / "test_numbered.py"
    path.write_text(TESTS.format(failing=failing))
    results = tmp_path / "tests.jsonl"
    done = subprocess.run([sys.executable, "-m", "benchmarks.shards", str(shards), "--", "-q", "-p",
                           "no:cacheprovider", "-p", "benchmarks.testlog", "--results-jsonl", str(results),
                           "--rootdir", str(tmp_path), str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    return done, [line for line in lines if "nodeid" in line], [line for line in lines if "event" in line]


@pytest.mark.parametrize("shards", [1, 3, 10])
def test_shards_run_every_test_once(tmp_path, shards):
    done, tests, events = _run_shards(tmp_path, shards)
    assert done.returncode == 0, done.stdout + done.stderr
    ids = sorted(t["nodeid"].split("[")[1].rstrip("]") for t in tests)
    assert ids == [str(k) for k in range(7)]
    assert {t["outcome"] for t in tests} == {"passed"}
    assert sum(e["event"] == "start" for e in events) == shards
    assert f"[{shards - 1}] " in done.stdout  # each line carries its shard's number


def test_a_failure_in_one_shard_fails_the_run(tmp_path):
    done, tests, _ = _run_shards(tmp_path, 3, failing=4)
    assert done.returncode == 1
    assert [t["outcome"] for t in tests].count("failed") == 1 and len(tests) == 7


@pytest.mark.parametrize("text", ["4", "a/b", "3/3", "-1/2", "0/0"])
def test_a_bad_shard_names_the_option(text):
    with pytest.raises(ValueError, match="--shard"):
        parse_shard(text)


def test_shards_need_the_plugin_and_a_count():
    done = subprocess.run([sys.executable, "-m", "benchmarks.shards", "0", "--", "-q"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "shards=0" in done.stderr
    done = subprocess.run([sys.executable, "-m", "benchmarks.shards", "2", "--", "-q", "tests/test_shards.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "-p benchmarks.testlog" in done.stderr
