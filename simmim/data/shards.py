"""placeholder"""
import os


def is_url(root) -> bool:
    return "://" in str(root)


def is_shard_root(root) -> bool:
    return os.path.isfile(os.path.join(root, "manifest.json"))
