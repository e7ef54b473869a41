// The shared library's soname is the installed name, not the crate's.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libhugearena.so.0");
}
