"""The data_scale benchmark's peer: a plain pandas script doing what kiln's ingest -> clean -> build_features do
to the synthetic table, the way one would write it by hand (whole frames in memory).

``python bench/_pandas_features.py SOURCE OUT_DIR``: read the Parquet file; drop rows without a label; drop
duplicate rows; fill numeric columns with their median and categorical ones with ``"__missing__"``; split
70/10/20 stratified by the label (scikit-learn, seed 42); standardise numeric columns with the train split's mean
and std; one-hot the 50 most frequent train values of each categorical column plus an unknown slot; write
train/val/test Parquet files (float32 features + the encoded label) and the raw test rows. Prints one JSON line:
rows read, wall and CPU seconds, peak RSS (MiB).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

TARGET, MAX_CATEGORIES, SEED = "label", 50, 42


def main(source: Path, out: Path) -> None:
    start = time.perf_counter()
    df = pd.read_parquet(source)
    rows = len(df)
    df = df.dropna(subset=[TARGET]).drop_duplicates().reset_index(drop=True)
    numeric = [c for c in df.columns if c != TARGET and pd.api.types.is_numeric_dtype(df[c])]
    categorical = [c for c in df.columns if c != TARGET and c not in numeric]
    df = df.fillna({**df[numeric].median().to_dict(), **dict.fromkeys(categorical, "__missing__")})
    rest, test = train_test_split(np.arange(len(df)), test_size=0.2, random_state=SEED, stratify=df[TARGET])
    train, val = train_test_split(rest, test_size=0.1 / 0.8, random_state=SEED, stratify=df[TARGET].iloc[rest])
    mean, std = df[numeric].iloc[train].mean(), df[numeric].iloc[train].std(ddof=0).replace(0, 1)
    vocab = {c: df[c].iloc[train].value_counts().index[:MAX_CATEGORIES] for c in categorical}
    classes = sorted(df[TARGET].iloc[train].unique())
    out.mkdir(parents=True, exist_ok=True)
    for name, rows_of in (("train", train), ("val", val), ("test", test)):
        part = df.iloc[rows_of]
        blocks = [((part[numeric] - mean) / std).astype(np.float32)]
        for c in categorical:
            known = part[c].where(part[c].isin(vocab[c]), "__unknown__")
            blocks.append(pd.get_dummies(known, prefix=c, dtype=np.float32))
        features = pd.concat(blocks, axis=1)
        features.columns = [f"f{i}" for i in range(features.shape[1])]
        features["target"] = pd.Categorical(part[TARGET], categories=classes).codes.astype(np.int64)
        features.to_parquet(out / f"{name}.parquet", index=False)
        if name == "test":
            part.to_parquet(out / "test_raw.parquet", index=False)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"rows": rows, "wall_s": time.perf_counter() - start, "cpu_s": usage.ru_utime + usage.ru_stime,
                      "peak_rss_mib": usage.ru_maxrss / 1024}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
