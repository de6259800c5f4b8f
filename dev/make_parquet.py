#!/usr/bin/env python3
"""Writes Parquet files with pyarrow for rhio's tests.

    make_parquet.py variants OUT_DIR           # small files in many shapes, listed in OUT_DIR/index.json
    make_parquet.py sized OUT_FILE MIB [ROWS_PER_GROUP]   # one file of about MIB mebibytes
    make_parquet.py appended V1 V2 MIB EXTRA_MIB ROWS_PER_GROUP
        # V1 of about MIB MiB, and V2 = the same row groups (byte-identical) + EXTRA_MIB more

Run it with the venv of dev/localenv.py (which installs pyarrow).
"""

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def table(rows, nested):
    ids = pa.array(range(rows), type=pa.int64())
    names = pa.array([f"name-{i}" for i in range(rows)])
    columns = {"id": ids, "name": names, "value": pa.array([i * 0.5 for i in range(rows)])}
    if nested:
        columns["tags"] = pa.array([[f"t{i % 7}", f"u{i % 3}"] if i % 5 else None for i in range(rows)])
        columns["point"] = pa.array([{"x": i, "y": -i} for i in range(rows)])
    return pa.table(columns)


def variants(out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = []
    shapes = [
        dict(rows=0, row_group_size=10, compression="none", page_index=False, nested=False),
        dict(rows=5, row_group_size=100, compression="snappy", page_index=False, nested=False),
        dict(rows=1000, row_group_size=100, compression="snappy", page_index=True, nested=False),
        dict(rows=1000, row_group_size=333, compression="zstd", page_index=True, nested=True),
        dict(rows=2500, row_group_size=250, compression="gzip", page_index=False, nested=True),
        dict(rows=777, row_group_size=1, compression="none", page_index=True, nested=False),
        dict(rows=4096, row_group_size=1024, compression="lz4", page_index=False, nested=True),
    ]
    for i, shape in enumerate(shapes):
        path = out / f"variant-{i}.parquet"
        pq.write_table(
            table(shape["rows"], shape["nested"]),
            path,
            row_group_size=shape["row_group_size"],
            compression=shape["compression"],
            write_page_index=shape["page_index"],
        )
        groups = pq.ParquetFile(path).metadata.num_row_groups
        index.append({"file": path.name, "rows": shape["rows"], "row_groups": groups, **shape})
    (out / "index.json").write_text(json.dumps(index, indent=2))


def sized(out_file, mib, rows_per_group=None):
    """About `mib` MiB of incompressible-ish data in row groups of `rows_per_group` rows."""
    import os

    target = int(mib) * (1 << 20)
    row_bytes = 1024
    rows = max(1, target // row_bytes)
    rows_per_group = int(rows_per_group) if rows_per_group else max(1, rows // 16)
    writer = None
    written = 0
    while written < rows:
        n = min(rows_per_group, rows - written)
        data = pa.table({
            "id": pa.array(range(written, written + n), type=pa.int64()),
            "blob": pa.array([os.urandom(row_bytes - 8) for _ in range(n)], type=pa.binary()),
        })
        if writer is None:
            writer = pq.ParquetWriter(out_file, data.schema, compression="none")
        writer.write_table(data, row_group_size=rows_per_group)
        written += n
    writer.close()


def appended(v1, v2, mib, extra_mib, rows_per_group):
    """Two versions of a dataset: v2 has v1's row groups (same bytes) followed by new ones."""
    import os
    row_bytes = 1024
    rows_per_group = int(rows_per_group)

    def groups(mib, first_id):
        rows = max(1, int(mib) * (1 << 20) // row_bytes)
        out = []
        for start in range(0, rows, rows_per_group):
            n = min(rows_per_group, rows - start)
            out.append(pa.table({
                "id": pa.array(range(first_id + start, first_id + start + n), type=pa.int64()),
                "blob": pa.array([os.urandom(row_bytes - 8) for _ in range(n)], type=pa.binary()),
            }))
        return out, first_id + rows

    old, next_id = groups(mib, 0)
    new, _ = groups(extra_mib, next_id)
    for path, tables in ((v1, old), (v2, old + new)):
        with pq.ParquetWriter(path, tables[0].schema, compression="none") as writer:
            for data in tables:
                writer.write_table(data, row_group_size=rows_per_group)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "variants":
        variants(sys.argv[2])
    elif len(sys.argv) == 7 and sys.argv[1] == "appended":
        appended(*sys.argv[2:7])
    elif len(sys.argv) >= 4 and sys.argv[1] == "sized":
        sized(*sys.argv[2:5])
    else:
        sys.exit(__doc__)
