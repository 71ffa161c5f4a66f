"""Stand-in for comfy_execution/progress.py: in a worker, progress goes to the host.

comfy-env replaces ``get_progress_state`` when a node runs (worker_side._patch_v3_progress);
before that there is no prompt, so there is nobody to report to.
"""


class _NoPrompt:
    def update_progress(self, node_id, value, max_value, image=None):
        pass


def get_progress_state():
    return _NoPrompt()
