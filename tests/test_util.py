"""dnnlib.util helpers: seed lists, durations, attribute dicts, atomic writes, construct-by-name."""

import os

import pytest

import dnnlib
from dnnlib import util


def test_int_lists_are_parsed_or_refused():
    assert util.parse_int_list('0-3,7,10-11') == [0, 1, 2, 3, 7, 10, 11]
    assert util.parse_int_list('5') == [5]
    for bad in ['', '5-2', 'a', '1-b', ',']:
        with pytest.raises(ValueError):
            util.parse_int_list(bad)


def test_durations_are_formatted_as_the_reference():
    assert util.format_time(5) == '5s'
    assert util.format_time(3 * 60 + 4) == '3m 04s'
    assert util.format_time(2 * 3600 + 3 * 60 + 4) == '2h 03m 04s'
    assert util.format_time(86400 + 2 * 3600 + 3 * 60 + 4) == '1d 02h 03m'


def test_easydict_reads_keys_as_attributes():
    d = dnnlib.EasyDict(a=1)
    d.b = 2
    assert d['b'] == 2 and d.a == 1
    with pytest.raises(AttributeError):
        _ = d.missing


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / 'out.bin'
    with pytest.raises(RuntimeError):
        with util.atomic_write(str(target)) as f:
            f.write(b'partial')
            raise RuntimeError('crash midway')
    assert os.listdir(tmp_path) == []
    with util.atomic_write(str(target)) as f:
        f.write(b'complete')
    assert target.read_bytes() == b'complete' and os.listdir(tmp_path) == ['out.bin']


def test_construct_class_by_name():
    obj = util.construct_class_by_name(class_name='dnnlib.EasyDict', x=3)
    assert obj.x == 3
    assert util.call_func_by_name(2, func_name='math.sqrt') == pytest.approx(2 ** 0.5)
    with pytest.raises((ImportError, AttributeError)):
        util.get_obj_by_name('dnnlib.no_such_thing')
