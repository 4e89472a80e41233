"""The papers' analyses: CART's task-vector spectra and Rethink's soups, templates and scaling."""
