"""Files written whole or not at all."""
import json
import os


def atomic_write(path, write, keep_ext=False):
    """write(tmp) to a temporary file beside `path`, then rename it to `path`: an interruption or a
    full disk leaves the previous file whole and no temporary file behind (the exception goes on).
    keep_ext ends the temporary name with path's extension, for writers that pick the format from
    it (matplotlib, PIL); a checkpoint's does not end in .ckpt, so a reader never takes it
    for one."""
    tmp = f"{path}.tmp{os.getpid()}" + (os.path.splitext(path)[1] if keep_ext else "")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def dump_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def write_json(path, obj):
    atomic_write(path, lambda tmp: dump_json(tmp, obj))


def outermost_missing(path):
    """The outermost folder on the way to `path` that does not exist yet, or None if path exists."""
    path, top = os.path.abspath(path), None
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path, top = os.path.dirname(path), path
    return top


def remove_empty_folders(path, top):
    """Remove path and its parents up to top (included) while they are empty folders."""
    path, top = os.path.abspath(path), os.path.abspath(top)
    while os.path.commonpath([path, top]) == top:
        try:
            os.rmdir(path)
        except OSError:  # not empty, gone, or not ours to remove
            return
        if path == top:
            return
        path = os.path.dirname(path)
