; Inno Setup 6 script for repomem. Built by build-windows.ps1, which passes:
;   /DAppVersion=0.1.0 /DSourceDir=<PyInstaller onedir folder> /DOutputDir=<folder> /DFlavour=cpu|cuda
;   /DIconFile=<repomem.ico>
; Per-user install by default (no admin rights needed), per-machine when the user picks it in the dialog.

#ifndef AppVersion
  #define AppVersion "0.1.0"
#endif
#ifndef Flavour
  #define Flavour "cpu"
#endif

[Setup]
AppId={{6C1D3E0A-9F5B-4B7E-8E47-3C2B9D1E5A10}
AppName=repomem
AppVersion={#AppVersion}
AppVerName=repomem {#AppVersion}
AppPublisher=repomem contributors
DefaultDirName={autopf}\repomem
DefaultGroupName=repomem
DisableProgramGroupPage=yes
PrivilegesRequired=lowest
PrivilegesRequiredOverridesAllowed=dialog
ArchitecturesAllowed=x64compatible
ArchitecturesInstallIn64BitMode=x64compatible
OutputDir={#OutputDir}
OutputBaseFilename=repomem-{#AppVersion}-windows-x64-{#Flavour}-setup
SetupIconFile={#IconFile}
UninstallDisplayIcon={app}\repomem-gui.exe
Compression=lzma2/max
SolidCompression=yes
LZMANumBlockThreads=4
WizardStyle=modern
ChangesEnvironment=yes

[Tasks]
Name: "desktopicon"; Description: "{cm:CreateDesktopIcon}"; GroupDescription: "{cm:AdditionalIcons}"; Flags: unchecked
Name: "addtopath"; Description: "Add the repomem command to PATH"; GroupDescription: "Command line:"

[Files]
Source: "{#SourceDir}\*"; DestDir: "{app}"; Flags: ignoreversion recursesubdirs createallsubdirs

[Icons]
Name: "{group}\repomem"; Filename: "{app}\repomem-gui.exe"; WorkingDir: "{userdocs}"
Name: "{group}\repomem (command prompt)"; Filename: "{cmd}"; Parameters: "/k ""{app}\repomem.exe"" --help"; WorkingDir: "{userdocs}"
Name: "{group}\Uninstall repomem"; Filename: "{uninstallexe}"
Name: "{autodesktop}\repomem"; Filename: "{app}\repomem-gui.exe"; WorkingDir: "{userdocs}"; Tasks: desktopicon

[Registry]
; PATH: the per-user variable for per-user installs, the system one for per-machine installs
Root: HKCU; Subkey: "Environment"; ValueType: expandsz; ValueName: "Path"; ValueData: "{olddata};{app}"; \
    Tasks: addtopath; Check: (not IsAdminInstallMode) and NeedsAddPath(ExpandConstant('{app}'))
Root: HKLM; Subkey: "SYSTEM\CurrentControlSet\Control\Session Manager\Environment"; ValueType: expandsz; \
    ValueName: "Path"; ValueData: "{olddata};{app}"; Tasks: addtopath; \
    Check: IsAdminInstallMode and NeedsAddPath(ExpandConstant('{app}'))

[Run]
Filename: "{app}\repomem-gui.exe"; Description: "{cm:LaunchProgram,repomem}"; Flags: nowait postinstall skipifsilent

[Code]
function NeedsAddPath(Dir: string): Boolean;
var
  Paths: string;
  RootKey: Integer;
  SubKey: string;
begin
  if IsAdminInstallMode then begin
    RootKey := HKEY_LOCAL_MACHINE;
    SubKey := 'SYSTEM\CurrentControlSet\Control\Session Manager\Environment';
  end else begin
    RootKey := HKEY_CURRENT_USER;
    SubKey := 'Environment';
  end;
  if not RegQueryStringValue(RootKey, SubKey, 'Path', Paths) then begin
    Result := True;
    exit;
  end;
  Result := Pos(';' + Uppercase(Dir) + ';', ';' + Uppercase(Paths) + ';') = 0;
end;

procedure RemoveFromPath(Dir: string);
var
  Paths: string;
  P: Integer;
  RootKey: Integer;
  SubKey: string;
begin
  if IsAdminInstallMode then begin
    RootKey := HKEY_LOCAL_MACHINE;
    SubKey := 'SYSTEM\CurrentControlSet\Control\Session Manager\Environment';
  end else begin
    RootKey := HKEY_CURRENT_USER;
    SubKey := 'Environment';
  end;
  if not RegQueryStringValue(RootKey, SubKey, 'Path', Paths) then exit;
  P := Pos(';' + Uppercase(Dir), Uppercase(Paths));
  if P > 0 then begin
    Delete(Paths, P, Length(Dir) + 1);
    RegWriteExpandStringValue(RootKey, SubKey, 'Path', Paths);
  end;
end;

procedure CurUninstallStepChanged(CurUninstallStep: TUninstallStep);
begin
  // models and repository memories live in %LOCALAPPDATA%\repomem and are kept (they can be large and
  // expensive to rebuild); the uninstaller only removes the program and its PATH entry
  if CurUninstallStep = usPostUninstall then RemoveFromPath(ExpandConstant('{app}'));
end;
