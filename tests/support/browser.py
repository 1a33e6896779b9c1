"""What a person does in the browser before anything else: log in."""


def login(page, base: str, email_addr: str, password: str) -> None:
    page.goto(f"{base}/login")
    page.get_by_label("Email").fill(email_addr)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
