//! The carrier: a QEMU-TCG VM with an emulated AMD-V CPU, where KVM has hardware semantics.
