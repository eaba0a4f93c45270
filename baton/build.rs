// With `--features cuda`, libtorch_cuda must stay linked even though no symbol of it is named
// directly (it registers the CUDA kernels at load time); `--as-needed` would drop it.
fn main() {
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
    }
}
