"""corral: Linux sandboxes for untrusted code, with a programmable host-side network."""
