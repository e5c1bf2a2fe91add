fn main() {
    println!("vccw");
}
