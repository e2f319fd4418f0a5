//! QEMU microvm driver: command lines, QMP, accelerator detection and process lifetime.
