"""Stand-in for ComfyUI's folder_paths inside isolated workers (read-only copy).

The host's folder configuration is copied in when the worker starts (see
worker_side.initialize); nodes can find models and write outputs where ComfyUI
expects them.
"""
import os
import time

base_path = ""
models_dir = ""
output_directory = ""
temp_directory = ""
input_directory = ""
user_directory = ""
folder_names_and_paths = {}
supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
disable_metadata = False    # the host's --disable-metadata (read by the shim's ui previews)


def _configure(snapshot):
    g = globals()
    for key in ("base_path", "models_dir", "output_directory", "temp_directory",
                "input_directory", "user_directory"):
        if snapshot.get(key):
            g[key] = snapshot[key]
    g["disable_metadata"] = bool(snapshot.get("disable_metadata"))
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


def _within(directory, path):
    directory, path = os.path.abspath(directory), os.path.abspath(path)
    return os.path.commonpath([directory, path]) == directory


def get_save_image_path(filename_prefix, output_dir, image_width=0, image_height=0):
    """ComfyUI's ``folder_paths.get_save_image_path``, as 0.33 has it: ``(folder,
    filename, next free counter, subfolder, prefix)``, the counter one past the highest
    ``<filename>_NNNNN_`` file there (so saving never overwrites an earlier image)."""
    if "%" in filename_prefix:
        now = time.localtime()
        for key, value in (("%width%", image_width), ("%height%", image_height),
                           ("%year%", now.tm_year), ("%month%", f"{now.tm_mon:02}"),
                           ("%day%", f"{now.tm_mday:02}"), ("%hour%", f"{now.tm_hour:02}"),
                           ("%minute%", f"{now.tm_min:02}"), ("%second%", f"{now.tm_sec:02}")):
            filename_prefix = filename_prefix.replace(key, str(value))
    subfolder = os.path.dirname(os.path.normpath(filename_prefix))
    filename = os.path.basename(os.path.normpath(filename_prefix))
    full_output_folder = os.path.join(output_dir, subfolder)
    if not _within(output_dir, full_output_folder):
        raise Exception("**** ERROR: Saving image outside the output folder is not allowed."
                        f"\n full_output_folder: {os.path.abspath(full_output_folder)}"
                        f"\n         output_dir: {output_dir}")
    counter = 1
    try:
        names = os.listdir(full_output_folder)
    except FileNotFoundError:
        os.makedirs(full_output_folder, exist_ok=True)
        names = []
    n = len(filename)
    for name in names:
        if os.path.normcase(name[:n]) != os.path.normcase(filename) or name[n:n + 1] != "_":
            continue
        try:
            digits = int(name[n + 1:].split(".")[0].split("_")[0])
        except ValueError:
            digits = 0
        counter = max(counter, digits + 1)
    return full_output_folder, filename, counter, subfolder, filename_prefix
