"""The stages of ``updp search`` / ``train`` / ``run`` over one resumable run directory, and the run config."""
