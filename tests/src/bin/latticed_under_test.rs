//! `latticed`, built inside the test crate so that the end-to-end tests can start it as a
//! process (cargo builds a package's binaries for its own tests only).

fn main() -> std::process::ExitCode {
    latticed::cli::main()
}
