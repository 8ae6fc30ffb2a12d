//! The `latticed` binary; everything is in [`latticed::cli`].

fn main() -> std::process::ExitCode {
    latticed::cli::main()
}
