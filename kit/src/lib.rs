//! tensorbake-kit: small pieces shared by more than one stage.
pub mod synth_image;
