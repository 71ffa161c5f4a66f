"""Stand-in for ComfyUI's folder_paths inside isolated workers (read-only copy).

The host's folder configuration is copied in when the worker starts (see
worker_side.initialize); nodes can find models and write outputs where ComfyUI
expects them.
"""
import os

base_path = ""
models_dir = ""
output_directory = ""
temp_directory = ""
input_directory = ""
user_directory = ""
folder_names_and_paths = {}
supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}


def _configure(snapshot):
    g = globals()
    for key in ("base_path", "models_dir", "output_directory", "temp_directory",
                "input_directory", "user_directory"):
        if snapshot.get(key):
            g[key] = snapshot[key]
    for name, (paths, exts) in snapshot.get("folder_names_and_paths", {}).items():
        folder_names_and_paths[name] = (list(paths), set(exts))


def get_output_directory():
    return output_directory


def get_temp_directory():
    return temp_directory


def get_input_directory():
    return input_directory


def get_user_directory():
    return user_directory


def get_folder_paths(folder_name):
    return list(folder_names_and_paths.get(folder_name, ([], set()))[0])


def get_filename_list(folder_name):
    paths, exts = folder_names_and_paths.get(folder_name, ([], set()))
    found = set()
    for root in paths:
        if not os.path.isdir(root):
            continue
        for dirpath, _dirs, files in os.walk(root, followlinks=True):
            for f in files:
                if not exts or os.path.splitext(f)[1].lower() in exts:
                    found.add(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(found)


def get_full_path(folder_name, filename):
    for root in get_folder_paths(folder_name):
        path = os.path.join(root, os.path.normpath(filename))
        if os.path.isfile(path):
            return path
    return None


def get_full_path_or_raise(folder_name, filename):
    path = get_full_path(folder_name, filename)
    if path is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return path
