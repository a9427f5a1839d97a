"""sharding.low_memory_schedule: libtpu's scheduler flags, set before libtpu starts, without
overriding flags the user set, and the AOT planner refusing to plan with another process's."""

import pytest

from medssl_jax import config_lib, tpu_schedule
from tests.utils import tiny_pretrain_config


def _config(low: bool):
    c = tiny_pretrain_config("simclr")
    c.sharding.low_memory_schedule = low
    return c


def test_flags_are_added_once_and_the_users_win():
    env = {}
    assert tpu_schedule.apply(_config(False), env) == () and env == {}
    added = tpu_schedule.apply(_config(True), env)
    assert added == tpu_schedule.LOW_MEMORY_FLAGS
    assert env["LIBTPU_INIT_ARGS"].split() == list(tpu_schedule.LOW_MEMORY_FLAGS)
    assert tpu_schedule.apply(_config(True), env) == ()  # already there: nothing twice
    user = {"LIBTPU_INIT_ARGS": "--xla_tpu_enable_latency_hiding_scheduler=true --foo=1"}
    assert tpu_schedule.apply(_config(True), user) == ()  # the user's setting of that flag wins
    assert user["LIBTPU_INIT_ARGS"] == "--xla_tpu_enable_latency_hiding_scheduler=true --foo=1"
    other = {"LIBTPU_INIT_ARGS": "--foo=1"}
    assert tpu_schedule.apply(_config(True), other) == tpu_schedule.LOW_MEMORY_FLAGS
    assert other["LIBTPU_INIT_ARGS"].split() == ["--foo=1", *tpu_schedule.LOW_MEMORY_FLAGS]


def test_low_memory_schedule_must_be_a_bool():
    c = _config(False)
    with c.sharding.ignore_type():
        c.sharding.low_memory_schedule = "yes"
    with pytest.raises(config_lib.ConfigError, match=r"config\.sharding\.low_memory_schedule"):
        config_lib.validate(c)
