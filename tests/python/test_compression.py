"""Per-field Blosc compression: LMDBWriter(compression=...), info, convert --compression."""
import json
import os
import struct
import subprocess
import sys

import lmdb
import numpy as np
import pytest
import torch

import torch_lmdb
from torch_lmdb import _zarr
from torch_lmdb import convert as tl_convert

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "torch_lmdb", *args], capture_output=True, text=True, env=env)


def radio_sample(i):
    t = np.linspace(0, 8 * np.pi, 4 * 256, dtype=np.float32).reshape(4, 256)
    cir = (np.sin(t * (1 + i % 5)) + 1j * np.cos(t)).astype(np.complex64)
    cir[:, 64:] = 0  # a channel impulse response dies out after its last path
    return {"cir": cir, "rssi": np.float32(-60 - i % 7), "pos": np.arange(3, dtype=np.float64) * i,
            "scene": f"scene-{i % 3}", "raw": bytes(range(i % 50, i % 50 + 150))}


def write(path, n=12, **kwargs):
    with torch_lmdb.LMDBWriter(path, **kwargs) as w:
        for i in range(n):
            w.write(radio_sample(i))
    return path


def samples_per_value(txn, env):
    raw = txn.get(b"samples_per_value", db=env.open_db(b"meta", txn=txn, create=False))
    return 1 if raw is None else json.loads(raw)


def record_span(value, slot):
    """[begin, end) of record `slot` inside a packed value (docs/FORMAT.md "Packed value",
    "Columnar packed value")."""
    assert value[:4] in (b"TLMP", b"TLMC")
    n = int.from_bytes(value[4:8], "little")
    ends = [int.from_bytes(value[8 + 4 * i:12 + 4 * i], "little") for i in range(n)]
    header = 8 + 4 * n
    if value[:4] == b"TLMC":  # u32 section size, the column section, then the records
        header += 4 + int.from_bytes(value[header:header + 4], "little")
    return header + (ends[slot - 1] if slot else 0), header + ends[slot]


def value_columns(value):
    """[(field, first slot, slots, codec, flags, decoded column)] of a columnar packed value
    ("TLMC", docs/FORMAT.md "Columnar packed value"), decoded with numcodecs' Blosc."""
    from numcodecs import Blosc
    assert value[:4] == b"TLMC"
    n = int.from_bytes(value[4:8], "little")
    at = 8 + 4 * n
    section = value[at + 4:at + 4 + int.from_bytes(value[at:at + 4], "little")]
    count, = struct.unpack_from("<I", section, 0)
    pos, out = 4, []
    for _ in range(count):
        field, first, slots, codec, flags, raw, stored = struct.unpack_from("<IIIBBII", section, pos)
        pos += 22
        column = Blosc().decode(section[pos:pos + stored])
        assert len(column) == raw
        out.append((field, first, slots, codec, flags, bytes(column)))
        pos += stored
    assert pos == len(section) - 8  # then the section's xxh3-64
    return out


def varint(data, pos):
    """An unsigned LEB128 value at data[pos:] (docs/FORMAT.md "Compact record"): (value, next pos)."""
    value = shift = 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def parse_fields(record, schema):
    """{field: (codec, payload offset, payload length)} of a record, parsed by hand (docs/FORMAT.md)."""
    version = int.from_bytes(record[4:6], "little")
    out = {}
    if version == 4:  # compact: fields by schema position
        count, pos = varint(record, 8)
        assert count == len(schema)
        for field in schema:
            codec = record[pos]
            pos += 1
            numel = 1
            for _ in field["shape"]:
                size, pos = varint(record, pos)
                numel *= size
            if codec == 3:  # in the value's column (value_columns): sizes only
                out[field["name"]] = (codec, None, numel * torch.empty(0, dtype=getattr(torch, field["dtype"])).element_size())
                continue
            if codec:
                length, pos = varint(record, pos)
            else:
                length = numel * torch.empty(0, dtype=getattr(torch, field["dtype"])).element_size()
            out[field["name"]] = (codec, pos, length)
            pos += length
        return version, out
    count = int.from_bytes(record[8:12], "little")
    pos = 12
    for _ in range(count):
        n = int.from_bytes(record[pos:pos + 8], "little")
        name = record[pos + 8:pos + 8 + n].decode()
        pos += 8 + n
        ndim = record[pos + 2]
        pos += 3 + 8 * ndim
        codec = 0
        if version == 2:
            codec = record[pos]
            pos += 1
        length = int.from_bytes(record[pos:pos + 8], "little")
        pos += 8
        out[name] = (codec, pos, length)
        pos += length
    return version, out


def read_record(path, index):
    """(record bytes, schema) of sample `index`, read with py-lmdb."""
    env = lmdb.open(path, max_dbs=4, readonly=True, lock=False)
    with env.begin() as txn:
        k = samples_per_value(txn, env)
        value = txn.get((index // k).to_bytes(8, "big"), db=env.open_db(b"samples", txn=txn, create=False))
        if k > 1:
            begin, end = record_span(value, index % k)
            value = value[begin:end]
        schema = json.loads(txn.get(b"schema", db=env.open_db(b"meta", txn=txn, create=False)))
    env.close()
    return value, schema


def record_codecs(path, index=0):
    """(record version, {field: codec byte}) of record `index`, parsed by hand (docs/FORMAT.md)."""
    version, fields = parse_fields(*read_record(path, index))
    return version, {name: codec for name, (codec, _, _) in fields.items()}


@pytest.mark.parametrize("compression, expected", [
    (None, {"cir": 0}),
    ("lz4", {"cir": 1}),
    ("zstd:7", {"cir": 2}),
    (("zstd", 3), {"cir": 2}),
    ({"cir": "lz4"}, {"cir": 1}),
    ({"cir": ("zstd", 9), "pos": None}, {"cir": 2}),
])
def test_writer_compression_forms_round_trip(tmp_path, compression, expected):
    path = write(str(tmp_path / "db"), compression=compression)
    version, codecs = record_codecs(path, 5)
    # Compressed samples share LMDB values in compact records (format version 5: with columns).
    assert version == (2 if compression is None else 4)
    assert torch_lmdb.info(path)["format_version"] == (2 if compression is None else 5)
    assert (torch_lmdb.info(path)["samples_per_value"] > 1) == (compression is not None)
    assert codecs["cir"] == expected["cir"]
    # str/bytes: raw; rssi (4 bytes): raw, as 12 samples' 48 bytes are too few for a column
    # (test_columnar_values_read_by_hand_give_the_samples_and_fewer_bytes has 200).
    assert codecs["scene"] == 0 and codecs["raw"] == 0 and codecs["rssi"] == 0
    ds = torch_lmdb.LMDBDataset(path, verify=True)
    for i in (0, 5, 11):
        got, want = ds[i], radio_sample(i)
        assert np.array_equal(got["cir"].numpy(), want["cir"])
        assert got["scene"] == want["scene"] and got["raw"] == want["raw"]
        assert np.array_equal(got["pos"].numpy(), want["pos"])
    batch = ds.get_batch([11, 3, 7])
    assert torch.equal(batch["cir"], torch.from_numpy(np.stack([radio_sample(i)["cir"] for i in (11, 3, 7)])))
    assert batch["scene"] == [radio_sample(i)["scene"] for i in (11, 3, 7)]


def test_compressed_database_is_smaller_and_info_shows_codecs_and_bytes(tmp_path):
    plain = write(str(tmp_path / "plain"), n=200)
    packed = write(str(tmp_path / "packed"), n=200, compression="zstd")
    info = torch_lmdb.info(packed)
    cir = next(f for f in info["fields"] if f["name"] == "cir")
    assert cir["codec"] == "zstd" and cir["level"] == 5
    assert cir["raw_bytes"] == 200 * 4 * 256 * 8
    assert 0 < cir["stored_bytes"] < cir["raw_bytes"] / 2
    scene = next(f for f in info["fields"] if f["name"] == "scene")
    assert scene["codec"] == "none" and scene["stored_bytes"] == scene["raw_bytes"]
    assert torch_lmdb.info(plain)["fields"][0]["codec"] == "none"
    assert os.path.getsize(os.path.join(packed, "data.mdb")) < os.path.getsize(os.path.join(plain, "data.mdb")) / 2
    text = cli("info", packed).stdout
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("cir "))
    assert "zstd:5" in line and "stored" in line and f"({cir['stored_bytes'] / cir['raw_bytes']:.2f}x)" in line


def test_unknown_codec_and_unknown_field_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"field 'cir': unknown codec 'gzip'"):
        torch_lmdb.LMDBWriter(str(tmp_path / "a"), compression={"cir": "gzip"})
    with pytest.raises(ValueError, match=r"every field.*unknown codec 'brotli'"):
        torch_lmdb.LMDBWriter(str(tmp_path / "b"), compression="brotli")
    with pytest.raises(ValueError, match=r"level '0' is not 1-9"):
        torch_lmdb.LMDBWriter(str(tmp_path / "c"), compression=("lz4", 0))
    with pytest.raises(TypeError, match=r"field 'cir'"):
        torch_lmdb.LMDBWriter(str(tmp_path / "d"), compression={"cir": 5})
    w = torch_lmdb.LMDBWriter(str(tmp_path / "e"), compression={"cri": "lz4"})
    with pytest.raises(ValueError, match=r"compression names field 'cri'.*fields: cir, rssi"):
        w.write(radio_sample(0))
    w.close()


def test_version1_database_reads_and_damaged_payload_names_field(tmp_path):
    old = write(str(tmp_path / "v1"), format_version=1)
    assert record_codecs(old)[0] == 1 and torch_lmdb.info(old)["format_version"] == 1
    assert np.array_equal(torch_lmdb.LMDBDataset(old)[3]["cir"].numpy(), radio_sample(3)["cir"])
    with pytest.raises(ValueError, match="cannot be compressed"):
        torch_lmdb.LMDBWriter(str(tmp_path / "v1z"), format_version=1, compression="lz4")
    # A damaged Blosc frame (no checksum to catch it first).
    path = write(str(tmp_path / "bad"), checksum=False, compression="lz4")
    env = lmdb.open(path, max_dbs=4)
    with env.begin(write=True) as txn:
        db = env.open_db(b"samples", txn=txn)
        k = samples_per_value(txn, env)
        assert 4 < k  # sample 4 lies inside the first value
        value = bytearray(txn.get((4 // k).to_bytes(8, "big"), db=db))
        begin, end = record_span(value, 4)
        schema = json.loads(txn.get(b"schema", db=env.open_db(b"meta", txn=txn)))
        frame = begin + parse_fields(bytes(value[begin:end]), schema)[1]["cir"][1]
        value[frame + 12] ^= 0x7F  # the frame's compressed length
        txn.put((4 // k).to_bytes(8, "big"), bytes(value), db=db)
    env.close()
    ds = torch_lmdb.LMDBDataset(path)
    with pytest.raises(torch_lmdb.CorruptedError, match=r"index 4.*field 'cir'"):
        ds[4]
    with pytest.raises(torch_lmdb.CorruptedError, match=r"index 4.*field 'cir'"):
        ds.get_batch([1, 4])
    assert np.array_equal(ds[5]["cir"].numpy(), radio_sample(5)["cir"])


def _zarr_array(group, name, data, codec):
    """An array compressed with `codec` (a numcodecs codec or None), zarr-python 2 or 3."""
    if _zarr.zarr_major() < 3:
        array = group.create_dataset(name, shape=data.shape, dtype=data.dtype, chunks=(25,) + data.shape[1:],
                                     compressor=codec)
    else:
        array = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=(25,) + data.shape[1:],
                                   compressors=[codec] if codec is not None else None)
    array[...] = data
    return array


def test_convert_puts_small_fields_in_columns_unless_no_columns(tmp_path):
    src = str(tmp_path / "src.zarr")
    group = _zarr.open_group(src, mode="w", zarr_format=_zarr.writable_formats()[-1])
    n = 600
    rng = np.random.default_rng(3)
    data = {"cir": np.stack([radio_sample(i)["cir"] for i in range(n)]),
            "rssi": np.round(rng.normal(-70, 10, (n, 4)), 1).astype(np.float32),
            "rx_id": (np.arange(n) % 64).astype(np.int32)}
    for name, array in data.items():
        _zarr.write_array(group, name, array, chunks=(100,) + array.shape[1:])
    out = {}
    for flag in ([], ["--no-columns"]):
        out[bool(flag)] = str(tmp_path / ("plain.lmdb" if flag else "columns.lmdb"))
        r = cli("convert", "--zarr-path", src, "--output", out[bool(flag)], *flag)
        assert r.returncode == 0, r.stderr
    columns, plain = out[False], out[True]
    assert torch_lmdb.info(columns)["format_version"] == 5 and torch_lmdb.info(plain)["format_version"] == 4
    assert "small fields in columns" in cli("info", columns).stdout
    stored = {path: {f["name"]: f["stored_bytes"] for f in torch_lmdb.info(path)["fields"]} for path in out.values()}
    assert stored[plain]["rssi"] == n * 16 and stored[plain]["rx_id"] == n * 4
    assert stored[columns]["rssi"] < n * 16 and stored[columns]["rx_id"] < n * 4 // 2  # (rssi: noise)
    a, b = torch_lmdb.LMDBDataset(columns, verify=True), torch_lmdb.LMDBDataset(plain, verify=True)
    order = list(rng.permutation(n)[:100])
    got, want = a.get_batch(order), b.get_batch(order)
    for name, array in data.items():
        assert torch.equal(got[name], want[name]) and np.array_equal(got[name].numpy(), array[order]), name


def test_convert_auto_follows_the_zarr_compressor(tmp_path):
    import numcodecs

    src = str(tmp_path / "src.zarr")
    group = _zarr.open_group(src, mode="w", zarr_format=2)
    n = 100
    cir = np.stack([radio_sample(i)["cir"] for i in range(n)])
    _zarr_array(group, "cir_lz4", cir, numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE))
    _zarr_array(group, "cir_zstd", cir, numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE))
    _zarr_array(group, "cir_zlib", cir, numcodecs.Zlib(level=5))
    _zarr_array(group, "cir_raw", cir, None)
    out = str(tmp_path / "auto.lmdb")
    proc = cli("convert", "--zarr-path", src, "--output", out, "--compression", "source")
    assert proc.returncode == 0, proc.stderr
    fields = {f["name"]: f for f in torch_lmdb.info(out)["fields"]}
    assert {k: f["codec"] for k, f in fields.items()} == {
        "cir_lz4": "lz4", "cir_zstd": "zstd", "cir_zlib": "zstd", "cir_raw": "none"}
    assert fields["cir_lz4"]["stored_bytes"] < fields["cir_raw"]["stored_bytes"] / 2
    ds = torch_lmdb.LMDBDataset(out)
    assert np.array_equal(ds[42]["cir_zstd"].numpy(), cir[42]) and np.array_equal(ds[42]["cir_raw"].numpy(), cir[42])
    forced = str(tmp_path / "none.lmdb")
    assert cli("convert", "--zarr-path", src, "--output", forced, "--compression", "none").returncode == 0
    assert {f["codec"] for f in torch_lmdb.info(forced)["fields"]} == {"none"}
    assert (os.path.getsize(os.path.join(out, "data.mdb"))
            < os.path.getsize(os.path.join(forced, "data.mdb")))
    assert tl_convert.source_codec(group["cir_lz4"]) == "lz4"


def test_convert_auto_follows_hdf5_filters(tmp_path):
    import h5py

    src = str(tmp_path / "src.h5")
    data = np.stack([radio_sample(i)["cir"] for i in range(40)])
    with h5py.File(src, "w") as f:
        f.create_dataset("gz", data=data, compression="gzip", chunks=(10, 4, 256))
        f.create_dataset("lzf", data=data, compression="lzf", chunks=(10, 4, 256))
        f.create_dataset("plain", data=data)
    out = str(tmp_path / "h.lmdb")
    tl_convert.convert("hdf5", src, out, compression="source", log=lambda *a, **k: None)
    assert {f["name"]: f["codec"] for f in torch_lmdb.info(out)["fields"]} == {
        "gz": "zstd", "lzf": "lz4", "plain": "none"}


def test_samples_per_value_packs_records_and_info_and_cli_show_it(tmp_path):
    path = write(str(tmp_path / "packed"), n=30, samples_per_value=7)  # uncompressed, packed on request
    info = torch_lmdb.info(path)
    assert info["format_version"] == 4 and info["samples_per_value"] == 7  # packed, compact records
    assert "format version: 4 (7 samples per LMDB value), compact records" in cli("info", path).stdout
    env = lmdb.open(path, max_dbs=4, readonly=True, lock=False)
    with env.begin() as txn:
        assert env.stat()["entries"] == 2  # samples + meta named databases
        assert txn.stat(env.open_db(b"samples", txn=txn, create=False))["entries"] == 5  # ceil(30 / 7)
    env.close()
    ds = torch_lmdb.LMDBDataset(path, verify=True)
    order = [29, 0, 13, 14, 6, 7, 28]
    batch = ds.get_batch(order)
    assert torch.equal(batch["cir"], torch.from_numpy(np.stack([radio_sample(i)["cir"] for i in order])))
    assert [ds[i]["raw"] for i in order] == [radio_sample(i)["raw"] for i in order]
    with torch_lmdb.LMDBWriter(path, mode="a") as w:  # keeps the database's packing
        w.write(radio_sample(30))
    assert torch_lmdb.info(path)["samples_per_value"] == 7
    assert torch_lmdb.LMDBDataset(path)[30]["scene"] == radio_sample(30)["scene"]
    with pytest.raises(ValueError, match="cannot append with samples_per_value 3"):
        torch_lmdb.LMDBWriter(path, mode="a", samples_per_value=3)
    for bad in (0, True, 70000, 2.0):
        with pytest.raises(ValueError, match="samples_per_value must be an int from 1 to 65536"):
            torch_lmdb.LMDBWriter(str(tmp_path / "bad"), samples_per_value=bad)


def test_columnar_values_read_by_hand_give_the_samples_and_fewer_bytes(tmp_path):
    """docs/FORMAT.md "Columnar packed value", read with py-lmdb and numcodecs alone."""
    columnar = write(str(tmp_path / "columnar"), n=200, compression="lz4")
    compact = write(str(tmp_path / "compact"), n=200, compression="lz4", format_version=4)
    assert torch_lmdb.info(columnar)["format_version"] == 5
    env = lmdb.open(columnar, max_dbs=4, readonly=True, lock=False)
    with env.begin() as txn:
        k = samples_per_value(txn, env)
        schema = json.loads(txn.get(b"schema", db=env.open_db(b"meta", txn=txn, create=False)))
        names = [f["name"] for f in schema]
        samples = env.open_db(b"samples", txn=txn, create=False)
        seen = set()
        for i in range(200):
            value = txn.get((i // k).to_bytes(8, "big"), db=samples)
            assert value[:4] == b"TLMC"
            begin, end = record_span(value, i % k)
            version, fields = parse_fields(value[begin:end], schema)
            want = radio_sample(i)
            for name, (codec, at, length) in fields.items():
                if codec != 3:
                    continue
                seen.add(name)
                field = names.index(name)
                slot = i % k
                (first, slots, flags, column), = [(f, n, fl, c) for f_, f, n, _, fl, c in value_columns(value)
                                                  if f_ == field and f <= slot < f + n]
                if flags & 1:  # u32 ends[slots], then the bytes
                    ends = struct.unpack_from(f"<{slots}I", column, 0)
                    lo = 4 * slots + (ends[slot - first - 1] if slot > first else 0)
                    got = column[lo:4 * slots + ends[slot - first]]
                else:
                    got = column[(slot - first) * length:(slot - first + 1) * length]
                assert len(got) == length
                assert got == np.ascontiguousarray(want[name]).tobytes(), (i, name)
    env.close()
    assert seen == {"rssi", "pos"}  # the fields under 128 bytes with a codec (str/bytes stay raw)
    assert os.path.getsize(os.path.join(columnar, "data.mdb")) <= os.path.getsize(os.path.join(compact, "data.mdb"))
    ds, plain = torch_lmdb.LMDBDataset(columnar, verify=True), torch_lmdb.LMDBDataset(compact, verify=True)
    order = [199, 0, 57, 58, 13, 100]
    a, b = ds.get_batch(order), plain.get_batch(order)
    assert all(torch.equal(a[f], b[f]) for f in ("cir", "rssi", "pos")) and a["scene"] == b["scene"]
    assert info_stored(columnar, "rssi") < info_stored(compact, "rssi") == 200 * 4


def info_stored(path, name):
    return {f["name"]: f["stored_bytes"] for f in torch_lmdb.info(path)["fields"]}[name]


def test_compact_records_read_by_hand_hold_the_same_payloads_in_fewer_bytes(tmp_path):
    compact = write(str(tmp_path / "compact"), n=40, compression="lz4", format_version=4)  # no columns
    named = write(str(tmp_path / "named"), n=40, compression="lz4", format_version=2)
    assert torch_lmdb.info(compact)["format_version"] == 4
    assert torch_lmdb.info(named)["format_version"] == 3  # packed, records named field by field
    for i in (0, 17, 39):
        rec_c, schema = read_record(compact, i)
        rec_n, _ = read_record(named, i)
        (vc, fc), (vn, fn) = parse_fields(rec_c, schema), parse_fields(rec_n, schema)
        assert (vc, vn) == (4, 2) and list(fc) == list(fn) == [f["name"] for f in schema]
        for name, (codec, at, length) in fc.items():  # the same stored payloads, byte for byte
            assert codec == fn[name][0]
            assert rec_c[at:at + length] == rec_n[fn[name][1]:fn[name][1] + fn[name][2]]
        _, at, length = fc["pos"]
        assert np.array_equal(np.frombuffer(rec_c[at:at + length], np.float64), radio_sample(i)["pos"])
        _, at, length = fc["scene"]
        assert rec_c[at:at + length].decode() == radio_sample(i)["scene"]
        last = fc["raw"]
        assert last[1] + last[2] + 8 == len(rec_c)  # then the checksum
        # Five fields: names and 20 bytes of lengths and codes each are gone.
        assert len(rec_c) + 5 * 20 <= len(rec_n)
    ds = torch_lmdb.LMDBDataset(compact, verify=True)
    assert torch.equal(ds.get_batch([3, 39])["cir"], torch.from_numpy(np.stack([radio_sample(i)["cir"] for i in (3, 39)])))
    with pytest.raises(ValueError, match="format_version 3 cannot be written"):
        torch_lmdb.LMDBWriter(str(tmp_path / "bad"), format_version=3)
    with pytest.raises(ValueError, match="samples_per_value 1 packs none"):  # columns live in packed values
        torch_lmdb.LMDBWriter(str(tmp_path / "bad"), format_version=5, samples_per_value=1, compression="lz4")


def test_get_batch_decodes_on_several_threads_with_the_same_result(tmp_path):
    rng = np.random.default_rng(3)
    path = str(tmp_path / "wide")
    with torch_lmdb.LMDBWriter(path, compression="lz4") as w:
        for i in range(160):  # 16 KiB float32 samples LZ4 keeps ~3/4 of: a batch of 64 is ~0.7 MiB compressed
            x = np.sin(np.linspace(0, 20 + i % 7, 4096)) + rng.normal(0, 0.01, 4096)
            w.write({"x": (np.round(x * 1000) / 1000).astype(np.float32), "i": i})
    order = rng.permutation(160)[:64].tolist()
    one = torch_lmdb.LMDBDataset(path, decode_threads=1).get_batch(order)
    for threads in (2, 4, None):
        got = torch_lmdb.LMDBDataset(path, decode_threads=threads).get_batch(order)
        assert torch.equal(got["x"], one["x"]) and got["i"].tolist() == order
    assert one["x"].shape == (64, 4096)
    for bad in (0, -1, True, 2.0, 65):
        with pytest.raises(ValueError, match="decode_threads must be an int from 1 to 64"):
            torch_lmdb.LMDBDataset(path, decode_threads=bad)


def _samples_values(path):
    import lmdb

    env = lmdb.open(path, readonly=True, lock=False, max_dbs=8)
    try:
        db = env.open_db(b"samples", create=False)
        with env.begin() as txn:
            return [bytes(v) for _, v in txn.cursor(db=db)]
    finally:
        env.close()


@pytest.mark.parametrize("codec", ["lz4", "zstd:3"])
def test_compress_threads_write_the_records_one_thread_writes(tmp_path, codec):
    rng = np.random.default_rng(3)
    samples = [{"x": rng.standard_normal(int(rng.integers(0, 2000))).astype(np.float32),
                "small": np.arange(i % 7, dtype=np.int64), "scene": f"scene {i}", "blob": bytes(i % 300),
                "y": np.int64(i)} for i in range(900)]
    values, infos = [], []
    for threads in (1, 2, 5):
        path = str(tmp_path / f"t{threads}.lmdb")
        with torch_lmdb.LMDBWriter(path, compression=codec, compress_threads=threads, commit_every=97) as w:
            w.write_many(samples[:600])
        with torch_lmdb.LMDBWriter(path, mode="a", compress_threads=threads, commit_every=97) as w:
            w.write_many(samples[600:])  # appending keeps the codec, on the same threads
        values.append(_samples_values(path))
        infos.append(torch_lmdb.info(path)["fields"])  # codecs, stored and raw bytes per field
        ds = torch_lmdb.LMDBDataset(path)
        for i in (0, 96, 97, 599, 600, 899):
            s = ds[i]
            assert torch.equal(s["x"], torch.from_numpy(samples[i]["x"])) and s["scene"] == f"scene {i}", i
            assert s["blob"] == samples[i]["blob"]
    assert values[0] and values[1] == values[0] and values[2] == values[0]
    assert infos[1] == infos[0] == infos[2]


@pytest.mark.parametrize("bad", [0, -1, 257, 1.5, True, "2"])
def test_compress_threads_out_of_range_is_refused_naming_it(tmp_path, bad):
    with pytest.raises(ValueError, match="compress_threads"):
        torch_lmdb.LMDBWriter(str(tmp_path / "x.lmdb"), compression="lz4", compress_threads=bad)
