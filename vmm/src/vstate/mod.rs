//! The KVM-side objects only: the system handle, the VM, the vCPU, guest memory.

pub mod kvm;
pub mod memory;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
