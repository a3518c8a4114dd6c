fn main() {
    println!("deltabox");
}
