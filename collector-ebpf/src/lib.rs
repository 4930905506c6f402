#![no_std]
//! Library target so that `collector` can name this crate as a build dependency (cargo then
//! rebuilds the collector when the kernel programs change). The programs are in `main.rs`.
