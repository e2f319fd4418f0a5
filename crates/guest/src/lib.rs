//! Guest assets: the kernel, the initramfs firkin writes itself, and root filesystem images.
