"""Files in and out: atomic writes, safetensors tensor files, adapter files, peft and merged exports, the run
folder's lock, and the base models read from the hub, a folder or the package's assets."""
