//! CPU inference kernels: weights repacked at load ([`packed_matrix`]), activations quantised
//! to 8 bits once per matrix input ([`quantize`]), integer dot products per instruction set
//! chosen by what the CPU runs ([`isa`]: AVX-512 VNNI, AVX2, portable; `probe` runs each in a child process), and a persistent
//! thread team ([`team`]). Nothing here knows about models; `model::packed_decoder` builds the
//! decode step from these parts.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod isa;
pub mod packed_matrix;
mod portable;
mod probe;
mod products;
pub mod quantize;
pub mod team;
pub mod vector;
pub mod vector_math;

#[cfg(test)]
mod tests;
