"""defectvlm: industrial inspection images -> a fine-tuned vision-language model, and its use.

`defectvlm.load_model(uri)` is the public entry point for using a trained model."""


def load_model(uri, device=None, tracking_uri=None):
    """A ready model + processor + inference config for `models:/<name>@<alias>`,
    `models:/<name>/<version>`, a run folder or an export folder (see inference/loading.py)."""
    from defectvlm.inference.loading import load_model as load

    return load(uri, device=device, tracking_uri=tracking_uri)
