fn main() -> std::process::ExitCode {
    irsa_agent::cli::main()
}
