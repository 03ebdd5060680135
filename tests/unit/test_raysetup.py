"""What ray.init is given: this chatsft as py_modules outside a job; inside a `ray job submit`
job, the job's runtime env extended (never a second package of the code the working dir holds)."""

import json
import os
from pathlib import Path

from chatsft.raysetup import JOB_CONFIG_ENV, runtime_env

SOURCE_ROOT = Path(__file__).resolve().parents[2] / "platform"


def _job(monkeypatch, **runtime_env):
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": runtime_env, "metadata": {}}))


def test_outside_a_job_the_package_travels_as_py_modules(monkeypatch):
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    env = runtime_env()
    assert list(env) == ["py_modules"]
    assert Path(env["py_modules"][0]) == SOURCE_ROOT / "chatsft"


def test_in_a_job_the_working_dir_is_extended_with_the_source_root(monkeypatch):
    monkeypatch.chdir(SOURCE_ROOT.parent)  # a job's driver starts in its working dir
    _job(monkeypatch, working_dir="gcs://_ray_pkg_x.zip", env_vars={"A": "1"})
    assert runtime_env() == {"env_vars": {"PYTHONPATH": "platform"}}  # relative: each node unpacks elsewhere


def test_in_a_job_the_submitters_pythonpath_is_left_alone(monkeypatch):
    monkeypatch.chdir(SOURCE_ROOT.parent)
    _job(monkeypatch, working_dir="gcs://_ray_pkg_x.zip", env_vars={"PYTHONPATH": "src"})
    assert runtime_env() == {}


def test_in_a_job_without_our_code_in_its_working_dir_nothing_is_added(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # chatsft is installed on the cluster, not in the working dir
    _job(monkeypatch, working_dir="gcs://_ray_pkg_x.zip")
    assert runtime_env() == {}
    monkeypatch.chdir(SOURCE_ROOT.parent)
    _job(monkeypatch)  # no working dir at all
    assert runtime_env() == {}
    assert os.environ[JOB_CONFIG_ENV]
