fn main() {
    eprintln!("forkd: CLI not wired yet");
    std::process::exit(2);
}
