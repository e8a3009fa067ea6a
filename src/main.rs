fn main() -> std::process::ExitCode {
    knockq::cli::main()
}
