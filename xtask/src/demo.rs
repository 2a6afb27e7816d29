//! The demo (README command 1).
pub fn run() -> Result<(), String> {
    Err("demo: not written yet".into())
}
