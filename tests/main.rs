//! ccpl's integration tests, one binary (`cargo test -p ccpl --test integration`): each file
//! here is a module named after it, so `cargo test -p ccpl --test integration kernel_layer::`
//! runs one of them. `common/` holds what they share.

#[macro_use]
mod common;

mod build;
mod errors;
mod golden;
mod gpu_api;
mod gpu_loss;
mod gradcheck;
mod kernel_golden;
mod kernel_image;
mod kernel_info_nce;
mod kernel_info_nce_fused;
mod kernel_layer;
mod kernel_neighbor;
mod kernel_normalize;
mod kernel_rows;
mod kernel_sampled_rows;
mod kernel_sampler;
mod kernel_similarity;
mod kernel_small_s;
mod kernel_small_s_rows_layers;
mod plans;
mod properties;
mod reference;
mod sampling;
mod state_across_steps;
